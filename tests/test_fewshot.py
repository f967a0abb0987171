"""Few-shot scoring math (tagger.fewshot and its use in scoring.tag_products) on hand-checkable inputs."""

from __future__ import annotations

import numpy as np
import pytest

from tagger import fewshot, scoring
from tagger.exemplars.validate import ImportRow, nearer_other_label, same_product_two_labels, validate_rows
from tagger.taxonomy.model import Attribute, Label, Taxonomy, TaxonomySet

KEYS = ("casual", "formal", "coastal")


def _taxonomy(coastal_exemplar_only: bool = False) -> TaxonomySet:
    labels = (Label("casual", "Casual", ("casual",)), Label("formal", "Formal", ("formal",)),
              Label("coastal", "Coastal", () if coastal_exemplar_only else ("coastal",),
                    exemplar_only=coastal_exemplar_only))
    return TaxonomySet((Taxonomy("style", (Attribute("style", "style", labels, threshold=0.5),)),))


def _prototypes() -> dict[str, scoring.LabelPrototypes]:
    # Three orthogonal label directions in a 4-d embedding space.
    return {"style": scoring.LabelPrototypes("style", KEYS, np.eye(3, 4, dtype=np.float32))}


def _images() -> np.ndarray:
    # Product 0 leans to casual, product 1 is torn between casual and formal.
    v = np.array([[0.9, 0.3, 0.1, 0.3], [0.6, 0.58, 0.1, 0.5]], dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# Features: label clusters along the first three axes of a 3-d feature space, around a common offset.
OFFSET = np.array([5.0, 5.0, 5.0])
EXEMPLARS = fewshot.AttributeExemplars(
    "style", ("casual", "casual", "formal", "formal"),
    (OFFSET + np.array([[1.0, 0, 0], [1.1, 0.1, 0], [0, 1.0, 0], [0.1, 1.1, 0]])).astype(np.float32),
    ("a", "b", "c", "d"))


def test_zero_exemplars_is_exactly_zero_shot() -> None:
    tax, protos, images = _taxonomy(), _prototypes(), _images()
    plain = scoring.tag_products(tax, protos, images, 20.0)
    empty = fewshot.AttributeExemplars("style", (), np.zeros((0, 3), dtype=np.float32))
    with_nothing = scoring.tag_products(tax, protos, images, 20.0, image_features=np.ones((2, 3), np.float32),
                                        exemplars={"style": empty})
    no_features = scoring.tag_products(tax, protos, images, 20.0, exemplars={"style": EXEMPLARS})
    assert plain == with_nothing == no_features
    assert all(d.exemplars == 0 for product in plain for d in product)
    expected = scoring.label_probabilities(images, protos["style"].vectors, 20.0)
    assert [d.score for d in plain[1]] == sorted(expected[1].tolist(), reverse=True)


def test_exemplars_pull_the_decision_towards_their_label() -> None:
    tax, protos, images = _taxonomy(), _prototypes(), _images()
    before = scoring.tag_products(tax, protos, images, 20.0)
    assert before[1][0].value == "casual"  # torn, casual slightly ahead
    formal_looking = (OFFSET + np.array([[0.05, 1.0, 0.0], [0.05, 1.0, 0.0]])).astype(np.float32)
    after = scoring.tag_products(tax, protos, images, 20.0, image_features=formal_looking,
                                 exemplars={"style": EXEMPLARS}, fewshot_params=fewshot.FewShotParams(10, 2, 1))
    assert after[1][0].value == "formal"
    assert after[1][0].exemplars == 4
    p_formal_before = next(d.score for d in before[0] if d.value == "formal")
    p_formal_after = next(d.score for d in after[0] if d.value == "formal")
    assert p_formal_after > p_formal_before


def test_weight_grows_with_exemplar_count_and_hand_computed_logits() -> None:
    assert fewshot.label_weights(np.array([0, 2, 6]), 2.0).tolist() == [0.0, 0.5, 0.75]
    # Centre = mean of the four exemplars; a product at the casual centroid has cosine 1 to casual.
    prepared = fewshot.prepare(EXEMPLARS, KEYS)
    assert prepared is not None and prepared.counts.tolist() == [2, 2, 0] and prepared.used == 4
    cos = fewshot.exemplar_cosines(prepared, (prepared.centre + prepared.centroids[0])[None, :])
    assert cos[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert cos[0, 2] == 0.0  # no exemplars: no evidence
    logits = fewshot.combine(np.zeros((1, 3)), cos, prepared.counts, fewshot.FewShotParams(10, 2, 2))
    assert logits[0, 0] == pytest.approx(0.5 * 10 * 1.0 / 2, abs=1e-4)  # w * s_e * cos / T
    assert logits[0, 2] == 0.0


def test_exemplar_only_label_is_learnt_from_exemplars_alone() -> None:
    tax, protos, images = _taxonomy(coastal_exemplar_only=True), _prototypes(), _images()
    # Without exemplars, an exemplar-only label can never be chosen (probability 0).
    plain = scoring.tag_products(tax, protos, images, 20.0)
    assert all(d.value != "coastal" or d.score == 0.0 for product in plain for d in product)
    coastal = fewshot.AttributeExemplars(
        "style", ("coastal",) * 3 + ("casual",) * 3,
        (OFFSET + np.array([[0, 0, 1.0], [0, 0.1, 1.0], [0.1, 0, 1.1], [1.0, 0, 0], [1.1, 0, 0], [1.0, 0.1, 0]])
         ).astype(np.float32))
    features = (OFFSET + np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])).astype(np.float32)
    tagged = scoring.tag_products(tax, protos, images, 20.0, image_features=features, exemplars={"style": coastal},
                                  fewshot_params=fewshot.FewShotParams(30, 1, 1))
    assert tagged[0][0].value == "coastal" and tagged[0][0].exemplars == 6
    assert tagged[1][0].value == "casual"


def test_products_without_features_fall_back_to_zero_shot() -> None:
    tax, protos, images = _taxonomy(), _prototypes(), _images()
    features = np.array([[np.nan] * 3, OFFSET + [0, 1.0, 0]], dtype=np.float32)
    tagged = scoring.tag_products(tax, protos, images, 20.0, image_features=features, exemplars={"style": EXEMPLARS})
    plain = scoring.tag_products(tax, protos, images, 20.0)
    assert tagged[0] == plain[0] and tagged[0][0].exemplars == 0
    assert tagged[1][0].exemplars == 4


def test_confidences_stay_probabilities() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 30, size=(200, 5))
    features = rng.normal(0, 1, size=(200, 8))
    ex = fewshot.AttributeExemplars("a", tuple("abcde"[i % 5] for i in range(12)), rng.normal(0, 1, (12, 8)))
    prepared = fewshot.prepare(ex, tuple("abcde"))
    for params in (fewshot.FewShotParams(0, 0, 1), fewshot.FewShotParams(500, 0, 0.05), fewshot.FewShotParams(30, 2, 3)):
        p, used, scored = fewshot.probabilities(logits, prepared, features, params,
                                                np.array([True, True, False, True, True]))
        assert np.all((p >= 0) & (p <= 1)) and np.allclose(p.sum(axis=1), 1.0)
        assert scored.all() and (used == 12).all()


def test_exemplars_of_removed_labels_are_ignored() -> None:
    ex = fewshot.AttributeExemplars("style", ("gone", "gone"), np.ones((2, 3), np.float32))
    assert fewshot.prepare(ex, KEYS) is None


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="temperature"):
        fewshot.FewShotParams(10, 2, 0)


def test_import_rows_are_checked_one_by_one() -> None:
    tax = _taxonomy(coastal_exemplar_only=True)
    rows = [ImportRow(2, "A", "style", "casual"), ImportRow(3, "B", "colour", "red"),
            ImportRow(4, "A", "style", "grunge"), ImportRow(5, "Z", "style", "formal"),
            ImportRow(6, "OLD", "style", "formal"), ImportRow(7, "A", "style", "Formal"),
            ImportRow(8, "B", "style", "Coastal"), ImportRow(9, "", "style", "casual")]
    good, problems = validate_rows(rows, tax, products={"A", "B", "OLD"}, with_features={"A", "B"})
    assert [(g.line, g.sku, g.label) for g in good] == [(2, "A", "casual"), (8, "B", "coastal")]
    reasons = {p.line: p.reason for p in problems}
    assert "unknown attribute 'colour'" in reasons[3]
    assert "unknown label 'grunge'" in reasons[4]
    assert "unknown SKU 'Z'" in reasons[5]
    assert "no stored image features" in reasons[6]
    assert "was given 'casual' on line 2" in reasons[7]
    assert "empty sku" in reasons[9]


def test_contradictions() -> None:
    tax = _taxonomy()
    found = same_product_two_labels([("A", "style", "casual"), ("A", "style", "formal"), ("B", "style", "casual")],
                                    tax)
    assert [(c.sku, c.kind) for c in found] == [("A", "two_labels")]
    # E is labelled casual but sits among the formal exemplars.
    ex = fewshot.AttributeExemplars(
        "style", EXEMPLARS.labels + ("casual",),
        np.vstack([EXEMPLARS.features, OFFSET + [0.05, 1.05, 0]]).astype(np.float32), EXEMPLARS.skus + ("e",))
    near = nearer_other_label({"style": ex})
    assert [(c.sku, c.kind) for c in near] == [("e", "nearer_other")]
    assert nearer_other_label({"style": EXEMPLARS}) == []


def test_fit_trusts_exemplars_only_where_the_prompts_fail() -> None:
    rng = np.random.default_rng(1)
    owners = np.repeat(np.arange(3), 8)
    clustered = (OFFSET + np.eye(3)[owners] + rng.normal(0, 0.05, (24, 3))).astype(np.float32)
    noise = (OFFSET + rng.normal(0, 1.0, (24, 3))).astype(np.float32)
    keys = ("a", "b", "c")
    base = fewshot.FewShotParams(5, 4, 1)
    # Prompts that point at the wrong label for every exemplar; features that separate the labels well.
    wrong = np.eye(3)[(owners + 1) % 3] * 3.0
    ex = fewshot.AttributeExemplars("x", tuple(keys[i] for i in owners), clustered)
    prepared = fewshot.prepare(ex, keys)
    assert prepared is not None
    assert fewshot.fit(wrong, prepared, clustered, prepared.owners, base).scale >= 20
    # Prompts that are right; features that are noise: the exemplars get no weight, probabilities stay as trained.
    right = np.eye(3)[owners] * 3.0
    ex = fewshot.AttributeExemplars("x", tuple(keys[i] for i in owners), noise)
    prepared = fewshot.prepare(ex, keys)
    assert prepared is not None
    fitted = fewshot.fit(right, prepared, noise, prepared.owners, base)
    assert fitted.scale <= 2.5 and fitted.temperature >= 1.0
    # Too few exemplars to hold any out: the configured parameters stay.
    few = fewshot.AttributeExemplars("x", ("a", "b", "c"), clustered[[0, 8, 16]])
    prepared = fewshot.prepare(few, keys)
    assert prepared is not None and fewshot.fit(right[[0, 8, 16]], prepared, few.features, prepared.owners, base) == base


def test_batch_decisions_equal_per_product_decisions() -> None:
    from tagger.taxonomy.loader import load_taxonomies
    from tagger.settings import REPO_ROOT

    rng = np.random.default_rng(3)
    # The shipped attributes, plus a multi-label one with per-label thresholds (none of the shipped ones has those).
    multi = Attribute("season", "extra", (Label("summer", "Summer", ("summer",), threshold=0.3),
                                          Label("winter", "Winter", ("winter",)), Label("rain", "Rain", ("rain",),
                                                                                          threshold=0.1)),
                      kind="multi", threshold=0.25, top_k=3)
    for attribute in [*load_taxonomies(REPO_ROOT / "taxonomies").attributes, multi]:
        keys = tuple(label.key for label in attribute.scored_labels)
        logits = rng.normal(0, 3, (300, len(keys)))
        logits[:5] = 0.0  # ties resolve the same way
        p = fewshot.softmax(logits)
        used = rng.integers(0, 9, 300)
        for default_threshold in (0.2, 0.5):
            batch = scoring.decide_many(attribute, keys, p, default_threshold, 3, used)
            single = [scoring.decide(attribute, keys, p[i], default_threshold, 3, int(used[i])) for i in range(300)]
            assert batch == single, attribute.name


def test_the_first_approvals_of_a_single_label_already_count_when_centred_on_the_catalog() -> None:
    # A shop's first approvals are often of one label only. Centred on the exemplars' own mean they would cancel
    # out; centred on the catalog's mean they pull products that look like them toward that label.
    tax, protos = _taxonomy(), _prototypes()
    images = _images()[1:]  # torn between casual and formal
    looks_formal = (OFFSET + np.array([[0.05, 1.0, 0.0]])).astype(np.float32)
    catalog_mean = OFFSET.astype(np.float32) + np.float32(0.3)
    params = fewshot.FewShotParams(scale=5.0, prior=4.0, fit=False)
    one_label = fewshot.AttributeExemplars("style", ("formal",), looks_formal[:1] + np.float32(0.01), ("x",),
                                           centre=catalog_mean)

    def formal_score(exemplars: fewshot.AttributeExemplars | None) -> float:
        decisions = scoring.tag_products(tax, protos, images, 20.0, image_features=looks_formal,
                                         exemplars=None if exemplars is None else {"style": exemplars},
                                         fewshot_params=params)[0]
        return next(d.score for d in decisions if d.value == "formal")

    without = formal_score(None)
    uncentred = fewshot.AttributeExemplars("style", ("formal",), one_label.features, ("x",))
    assert formal_score(uncentred) == pytest.approx(without)  # the old behaviour: no effect at all
    assert formal_score(one_label) > without + 0.05
