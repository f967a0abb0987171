"""Zero-shot scoring and near-duplicate rules, on small hand-made vectors (pure NumPy, no model, no database)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tagger.duplicates import DuplicatePair, select_duplicates
from tagger.settings import REPO_ROOT
from tagger.scoring import (
    ACCEPTED,
    ALTERNATIVE,
    NEEDS_REVIEW,
    LabelPrototypes,
    applies,
    build_prototypes,
    decide,
    ensemble,
    label_probabilities,
    prompt_plan,
    softmax,
    tag_products,
)
from tagger.taxonomy import load_taxonomies
from tagger.taxonomy.model import Attribute, Label, Taxonomy, TaxonomySet

R = 1 / math.sqrt(2)


def label(key: str, *, parent: str | None = None, threshold: float | None = None, prompts: tuple[str, ...] = ()
          ) -> Label:
    return Label(key=key, name=key, prompts=prompts or (key,), parent=parent, threshold=threshold)


def flat(*labels: Label, name: str = "colour", kind: str = "single", threshold: float | None = 0.5,
         top_k: int | None = 3, applies_to: dict | None = None, templates: tuple[str, ...] = ("{}",)) -> Attribute:
    return Attribute(name=name, taxonomy="t", labels=labels, kind=kind, threshold=threshold, top_k=top_k,
                     applies_to=applies_to or {}, templates=templates)


@pytest.fixture(scope="module")
def shipped() -> TaxonomySet:
    return load_taxonomies(REPO_ROOT / "taxonomies")


# ---- ensemble / probabilities -------------------------------------------------------------------------------


def test_ensemble_averages_and_renormalises():
    texts = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]], dtype=np.float32)
    owners = np.array([0, 0, 1])
    result = ensemble(texts, owners, 2)
    assert result.dtype == np.float32 and result.shape == (2, 2)
    # label 0: mean of (1,0) and (0,1) = (0.5,0.5) -> (1/sqrt2, 1/sqrt2); label 1: (3,4)/5
    np.testing.assert_allclose(result, [[R, R], [0.6, 0.8]], atol=1e-6)


def test_ensemble_of_opposite_prompts_is_zero_not_nan():
    result = ensemble(np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]]), np.array([0, 0, 1]), 2)
    assert np.all(np.isfinite(result))
    np.testing.assert_allclose(result, [[0.0, 0.0], [0.0, 1.0]], atol=1e-6)


def test_label_probabilities_by_hand():
    protos = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    image = np.array([[1.0, 0.0]], dtype=np.float32)
    p = label_probabilities(image, protos, logit_scale=1.0)
    e = math.e
    np.testing.assert_allclose(p, [[e / (e + 1), 1 / (e + 1)]], rtol=1e-6)  # 0.731, 0.269
    sharp = label_probabilities(image, protos, logit_scale=10.0)
    np.testing.assert_allclose(sharp[0, 0], 1 / (1 + math.exp(-10)), rtol=1e-6)
    assert sharp[0, 0] > p[0, 0]


def test_label_probability_rows_sum_to_one():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(5, 8)).astype(np.float32)
    protos = rng.normal(size=(4, 8)).astype(np.float32)
    texts = rng.normal(size=(5, 8)).astype(np.float32)
    for scale in (1.0, 100.0):
        p = label_probabilities(images, protos, scale, texts, 0.3)
        assert p.shape == (5, 4)
        np.testing.assert_allclose(p.sum(axis=1), np.ones(5), rtol=1e-9)
        assert np.all(p >= 0)


def test_softmax_is_stable_for_large_logits():
    p = softmax(np.array([[1000.0, 999.0]]))
    np.testing.assert_allclose(p, [[1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))]], rtol=1e-9)


def test_text_weight_can_flip_the_winner():
    protos = np.array([[1.0, 0.0], [0.0, 1.0]])
    image = np.array([[1.0, 0.0]])  # looks like label 0
    text = np.array([[0.0, 1.0]])  # reads like label 1
    assert label_probabilities(image, protos, 10.0, text, 0.0).argmax() == 0  # weight 0: text ignored
    # 0.75 text: similarities (0.25, 0.75) -> label 1
    mixed = label_probabilities(image, protos, 10.0, text, 0.75)
    assert mixed.argmax() == 1
    np.testing.assert_allclose(mixed[0, 1], 1 / (1 + math.exp(-5)), rtol=1e-6)
    tie = label_probabilities(image, protos, 10.0, text, 0.5)
    np.testing.assert_allclose(tie, [[0.5, 0.5]])
    # no text vectors: weight is ignored
    np.testing.assert_allclose(label_probabilities(image, protos, 10.0, None, 0.9),
                               label_probabilities(image, protos, 10.0))


# ---- decide ---------------------------------------------------------------------------------------------------

RGB = ("red", "green", "blue")


def statuses(decisions) -> list[tuple[str, int, str]]:
    return [(d.value, d.rank, d.status) for d in decisions]


def test_single_rank_one_accepted_others_alternatives():
    attribute = flat(label("red"), label("green"), label("blue"), threshold=0.5)
    decisions = decide(attribute, RGB, np.array([0.1, 0.6, 0.3]), default_threshold=0.9, default_top_k=3)
    assert statuses(decisions) == [("green", 1, ACCEPTED), ("blue", 2, ALTERNATIVE), ("red", 3, ALTERNATIVE)]
    assert decisions[0].score == pytest.approx(0.6)
    assert decisions[0].taxonomy == "t" and decisions[0].attribute == "colour"
    assert decisions[0].path is None


def test_threshold_is_inclusive_and_below_needs_review():
    attribute = flat(label("red"), label("green"), label("blue"), threshold=0.5)
    at = decide(attribute, RGB, np.array([0.5, 0.25, 0.25]), 0.9, 3)
    assert at[0].status == ACCEPTED
    below = decide(attribute, RGB, np.array([0.49, 0.26, 0.25]), 0.0, 3)
    assert statuses(below) == [("red", 1, NEEDS_REVIEW), ("green", 2, ALTERNATIVE), ("blue", 3, ALTERNATIVE)]


def test_label_threshold_overrides_attribute_threshold():
    strict_red = flat(label("red", threshold=0.7), label("green"), label("blue"), threshold=0.5)
    assert decide(strict_red, RGB, np.array([0.6, 0.3, 0.1]), 0.5, 3)[0].status == NEEDS_REVIEW
    lenient_red = flat(label("red", threshold=0.3), label("green"), label("blue"), threshold=0.5)
    assert decide(lenient_red, RGB, np.array([0.4, 0.35, 0.25]), 0.5, 3)[0].status == ACCEPTED
    # another label's threshold does not apply to red
    assert decide(lenient_red, RGB, np.array([0.35, 0.4, 0.25]), 0.5, 3)[0].status == NEEDS_REVIEW


def test_attribute_threshold_overrides_default():
    own = flat(label("red"), label("green"), label("blue"), threshold=0.45)
    assert decide(own, RGB, np.array([0.5, 0.3, 0.2]), default_threshold=0.9, default_top_k=3)[0].status == ACCEPTED
    inherit = flat(label("red"), label("green"), label("blue"), threshold=None)
    assert decide(inherit, RGB, np.array([0.5, 0.3, 0.2]), 0.9, 3)[0].status == NEEDS_REVIEW
    assert decide(inherit, RGB, np.array([0.5, 0.3, 0.2]), 0.4, 3)[0].status == ACCEPTED


def test_multi_label_accepts_every_top_k_label_above_threshold():
    attribute = flat(label("red"), label("green"), label("blue"), label("black"), kind="multi", threshold=0.25,
                     top_k=3)
    keys = ("red", "green", "blue", "black")
    decisions = decide(attribute, keys, np.array([0.35, 0.05, 0.3, 0.3]), 0.9, 5)
    # blue and black tie at 0.3: stable order keeps blue (earlier) first
    assert statuses(decisions) == [("red", 1, ACCEPTED), ("blue", 2, ACCEPTED), ("black", 3, ACCEPTED)]
    low = decide(attribute, keys, np.array([0.4, 0.1, 0.2, 0.3]), 0.9, 5)
    assert statuses(low) == [("red", 1, ACCEPTED), ("black", 2, ACCEPTED), ("blue", 3, ALTERNATIVE)]
    ties = decide(attribute, keys, np.array([0.24, 0.26, 0.24, 0.26]), 0.9, 5)
    assert [d.status for d in ties] == [ACCEPTED, ACCEPTED, ALTERNATIVE]
    weak = flat(label("a"), label("b"), kind="multi", threshold=0.8)
    assert [d.status for d in decide(weak, ("a", "b"), np.array([0.6, 0.4]), 0.5, 3)] == [NEEDS_REVIEW, ALTERNATIVE]


def test_top_k_is_honoured():
    keys = ("a", "b", "c", "d")
    labels = [label(k) for k in keys]
    p = np.array([0.1, 0.4, 0.3, 0.2])
    assert [d.value for d in decide(flat(*labels, top_k=2), keys, p, 0.5, 3)] == ["b", "c"]
    assert [d.value for d in decide(flat(*labels, top_k=None), keys, p, 0.5, 3)] == ["b", "c", "d"]
    assert [d.value for d in decide(flat(*labels, top_k=None), keys, p, 0.5, 1)] == ["b"]
    assert len(decide(flat(*labels, top_k=10), keys, p, 0.5, 3)) == 4  # capped at the number of labels


def test_hierarchical_path_is_filled():
    attribute = Attribute(name="category", taxonomy="category", hierarchical=True, threshold=0.5, top_k=2, labels=(
        label("apparel"), label("topwear", parent="apparel"), label("tshirts", parent="topwear"),
        label("footwear"), label("sandals", parent="footwear")))
    keys = tuple(lbl.key for lbl in attribute.scored_labels)
    assert keys == ("tshirts", "sandals")
    decisions = decide(attribute, keys, np.array([0.8, 0.2]), 0.5, 3)
    assert [(d.value, d.path, d.status) for d in decisions] == [
        ("tshirts", "apparel > topwear > tshirts", ACCEPTED), ("sandals", "footwear > sandals", ALTERNATIVE)]


# ---- conditions ----------------------------------------------------------------------------------------------


def test_applies_with_ancestors(shipped):
    sleeve = shipped.attribute("sleeve_length")  # applies_to category: topwear, dresses_group, kurtas
    assert applies(sleeve, shipped, {"category": "tshirts"})  # tshirts -> topwear
    assert applies(sleeve, shipped, {"category": "dresses"})  # dresses -> dresses_group
    assert applies(sleeve, shipped, {"category": "kurtas"})  # named directly
    assert not applies(sleeve, shipped, {"category": "casual_shoes"})
    assert not applies(sleeve, shipped, {"category": "jeans"})  # apparel, but not topwear
    assert not applies(sleeve, shipped, {})  # condition not decided yet
    pattern = shipped.attribute("pattern")  # applies_to category: apparel
    assert applies(pattern, shipped, {"category": "jeans"})
    assert not applies(pattern, shipped, {"category": "watches"})
    assert applies(shipped.attribute("colour"), shipped, {})  # no condition


# ---- tag_products --------------------------------------------------------------------------------------------


def small_set() -> TaxonomySet:
    category = Attribute(name="category", taxonomy="cat", hierarchical=True, threshold=0.5, top_k=1, labels=(
        label("apparel"), label("topwear", parent="apparel"), label("tshirts", parent="topwear"),
        label("footwear"), label("shoes", parent="footwear")))
    sleeve = flat(label("short"), label("long"), name="sleeve", threshold=0.5, top_k=1,
                  applies_to={"category": ("topwear",)})
    return TaxonomySet((Taxonomy("cat", (category,)), Taxonomy("attrs", (sleeve,))))


def small_prototypes() -> dict[str, LabelPrototypes]:
    eye = np.eye(4, dtype=np.float32)
    return {"category": LabelPrototypes("category", ("tshirts", "shoes"), eye[[0, 1]]),
            "sleeve": LabelPrototypes("sleeve", ("short", "long"), eye[[2, 3]])}


def test_tag_products_skips_attributes_whose_condition_fails():
    tshirt = np.array([1.0, 0.0, 1.0, 0.0]) * R  # tshirts + short sleeve
    shoe = np.array([0.0, 1.0, 0.0, 1.0]) * R  # shoes (+ something that looks like a long sleeve)
    results = tag_products(small_set(), small_prototypes(), np.stack([tshirt, shoe]), logit_scale=100.0)
    assert [(d.attribute, d.value, d.status) for d in results[0]] == [
        ("category", "tshirts", ACCEPTED), ("sleeve", "short", ACCEPTED)]
    assert results[0][0].path == "apparel > topwear > tshirts"
    assert [(d.attribute, d.value) for d in results[1]] == [("category", "shoes")]


def test_tag_products_attribute_filter_still_evaluates_conditions():
    tshirt = np.array([1.0, 0.0, 0.0, 1.0]) * R
    shoe = np.array([0.0, 1.0, 0.0, 1.0]) * R
    results = tag_products(small_set(), small_prototypes(), np.stack([tshirt, shoe]), 100.0, attributes=["sleeve"])
    assert [(d.attribute, d.value) for d in results[0]] == [("sleeve", "long")]
    assert results[1] == []


def test_tag_products_text_weight_reaches_the_scores():
    image = np.array([[1.0, 0.0, 0.0, 0.0]])  # tshirt, no sleeve information
    text = np.array([[1.0, 0.0, 0.0, 1.0]]) * R  # the text says long sleeve
    results = tag_products(small_set(), small_prototypes(), image, 100.0, text_vectors=text, text_weight=0.5)
    sleeve = [d for d in results[0] if d.attribute == "sleeve"]
    assert [d.value for d in sleeve] == ["long"]
    no_text = tag_products(small_set(), small_prototypes(), image, 100.0)
    assert [d.score for d in no_text[0] if d.attribute == "sleeve"] == [pytest.approx(0.5)]


def test_tag_products_with_shipped_taxonomies_and_orthogonal_prototypes(shipped):
    # every (attribute, scored label) gets its own axis; a product is the normalised sum of its labels' axes
    axes: dict[tuple[str, str], int] = {}
    for attribute in shipped.attributes:
        for lbl in attribute.scored_labels:
            axes[(attribute.name, lbl.key)] = len(axes)
    eye = np.eye(len(axes), dtype=np.float32)
    prototypes = {a.name: LabelPrototypes(a.name, tuple(lbl.key for lbl in a.scored_labels),
                                          eye[[axes[(a.name, lbl.key)] for lbl in a.scored_labels]])
                  for a in shipped.attributes}

    def product(**values: str) -> np.ndarray:
        vector = sum(eye[axes[item]] for item in values.items())
        return vector / np.linalg.norm(vector)

    shoe = product(category="casual_shoes", colour="black", sleeve_length="long_sleeve", season="summer",
                   material="leather")
    tee = product(category="tshirts", colour="red", sleeve_length="short_sleeve", neckline="round_neck")
    results = tag_products(shipped, prototypes, np.stack([shoe, tee]), logit_scale=100.0)
    top = [{d.attribute: d.value for d in r if d.rank == 1} for r in results]
    assert top[0]["category"] == "casual_shoes" and top[0]["colour"] == "black"
    assert top[0]["season"] == "summer" and top[0]["material"] == "leather"  # apply to footwear
    for skipped in ("sleeve_length", "neckline", "fit", "pattern"):
        assert skipped not in top[0], skipped
    assert top[1]["category"] == "tshirts" and top[1]["sleeve_length"] == "short_sleeve"
    assert top[1]["neckline"] == "round_neck"
    assert {"pattern", "fit", "season", "material"} <= set(top[1])
    accepted = {(d.attribute, d.value) for d in results[1] if d.status == ACCEPTED}
    assert ("sleeve_length", "short_sleeve") in accepted


# ---- build_prototypes ----------------------------------------------------------------------------------------


def test_build_prototypes_with_a_fake_encoder():
    colour = flat(label("red", prompts=("red", "crimson")), label("blue"), name="colour", templates=("{}",))
    size = flat(label("big"), label("small"), name="size", templates=("a {} thing", "{}"))
    taxonomies = TaxonomySet((Taxonomy("t", (colour, size)),))
    vocabulary = {"red": [1, 0, 0], "crimson": [0, 1, 0], "blue": [0, 0, 1],
                  "a big thing": [3, 0, 0], "big": [0, 4, 0], "a small thing": [0, 0, 2], "small": [0, 0, 5]}
    calls: list[list[str]] = []

    def encode_texts(texts):
        calls.append(list(texts))
        return np.array([vocabulary[t] for t in texts], dtype=np.float32)

    prototypes = build_prototypes(taxonomies, encode_texts)
    assert len(calls) == 1  # one batch for all attributes
    assert calls[0] == ["red", "crimson", "blue", "a big thing", "big", "a small thing", "small"]
    assert prototypes["colour"].keys == ("red", "blue")
    np.testing.assert_allclose(prototypes["colour"].vectors, [[R, R, 0], [0, 0, 1]], atol=1e-6)
    assert prototypes["size"].keys == ("big", "small")
    np.testing.assert_allclose(prototypes["size"].vectors, [[0.6, 0.8, 0], [0, 0, 1]], atol=1e-6)


def test_build_prototypes_uses_leaves_of_a_hierarchy(shipped):
    def encode_texts(texts):
        # deterministic: a vector from the text's bytes
        return np.array([[len(t), sum(t.encode()) % 97 + 1, t.count(" ") + 1] for t in texts], dtype=np.float32)

    prototypes = build_prototypes(shipped, encode_texts)
    category = shipped.attribute("category")
    assert prototypes["category"].keys == tuple(lbl.key for lbl in category.scored_labels)
    assert "apparel" not in prototypes["category"].keys
    assert set(prototypes) == {a.name for a in shipped.attributes}
    for proto in prototypes.values():
        assert proto.vectors.shape == (len(proto.keys), 3)
        np.testing.assert_allclose(np.linalg.norm(proto.vectors, axis=1), 1.0, rtol=1e-5)
    texts, owners = prompt_plan(category)
    assert len(texts) == len(owners) == sum(len(lbl.prompts) * 3 for lbl in category.scored_labels)


# ---- duplicates ----------------------------------------------------------------------------------------------


def test_duplicate_pair_orders_the_skus():
    pair = DuplicatePair.of("SKU-B", "SKU-A", 0.97)
    assert (pair.sku_a, pair.sku_b, pair.similarity) == ("SKU-A", "SKU-B", 0.97)
    assert DuplicatePair.of("SKU-A", "SKU-B", 0.97) == pair
    assert pair.other("SKU-A") == "SKU-B" and pair.other("SKU-B") == "SKU-A"


def test_duplicate_pair_refuses_self_pairs():
    with pytest.raises(ValueError, match="own duplicate"):
        DuplicatePair.of("X", "X", 1.0)


def test_select_duplicates():
    neighbours = [("C", 0.95), ("A", 0.90), ("SELF", 1.0), ("D", 0.8999), ("B", 0.99), ("E", 0.95)]
    pairs = select_duplicates("SELF", neighbours, threshold=0.90)
    assert [(p.other("SELF"), p.similarity) for p in pairs] == [("B", 0.99), ("C", 0.95), ("E", 0.95), ("A", 0.90)]
    assert all("SELF" in (p.sku_a, p.sku_b) for p in pairs)
    assert pairs[0] == DuplicatePair("B", "SELF", 0.99)  # stored ordered: 'B' < 'SELF'


def test_select_duplicates_dedups_and_clamps():
    pairs = select_duplicates("M", [("N", 0.93), ("N", 0.93), ("O", 1.0000002)], threshold=0.9)
    assert [(p.sku_a, p.sku_b, p.similarity) for p in pairs] == [("M", "O", 1.0), ("M", "N", 0.93)]


def test_select_duplicates_none_above_threshold():
    assert select_duplicates("M", [("N", 0.5), ("M", 1.0)], threshold=0.9) == []
    assert select_duplicates("M", [], threshold=0.0) == []


def test_select_duplicates_keeps_the_best_score_of_a_repeated_neighbour():
    from tagger.duplicates import select_duplicates

    pairs = select_duplicates("A", [("B", 0.99), ("B", 0.91)], 0.9)
    assert [(p.sku_a, p.sku_b, p.similarity) for p in pairs] == [("A", "B", 0.99)]


def test_a_products_scores_do_not_depend_on_the_batch_it_is_scored_in() -> None:
    # A redelivered event is scored alone; the first delivery may have been scored in a batch. Equal stored
    # scores (float32) are what keeps the redelivery from rewriting its tags.
    from tagger import scoring

    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(64, 512)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    prototypes = rng.normal(size=(40, 512)).astype(np.float32)
    prototypes /= np.linalg.norm(prototypes, axis=1, keepdims=True)
    together = scoring.label_probabilities(vectors, prototypes, 50.0).astype(np.float32)
    alone = np.stack([scoring.label_probabilities(v[None, :], prototypes, 50.0)[0] for v in vectors]).astype(np.float32)
    assert np.array_equal(together, alone)
