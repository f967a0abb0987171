"""`tagger eval`: metrics checked by hand on small inputs, and one smoke run of each command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tagger.evaluation import metrics
from tagger.evaluation.alterations import ALTERATIONS, alter_all
from tagger.evaluation.cli import main, map_labels, pick_negatives
from tagger.evaluation.data import DataError, load_eval_data, load_mapping
from tagger.settings import REPO_ROOT
from tagger.taxonomy import load_taxonomies

SAMPLES = REPO_ROOT / "samples" / "catalog"
TAXONOMIES = REPO_ROOT / "taxonomies"
MAPPINGS = REPO_ROOT / "tagger" / "evaluation" / "mappings"


# ---- classification ----------------------------------------------------------------------------------


def test_confusion_matrix_and_f1_by_hand() -> None:
    # true: A x5, B x3, C x2
    y_true = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 2, 1, 1, 0, 2, 1])
    matrix = metrics.confusion_matrix(y_true, y_pred, 3)
    #            pred A  B  C
    expected = [[3, 1, 1],   # true A (support 5)
                [1, 2, 0],   # true B (support 3)
                [0, 1, 1]]   # true C (support 2)
    assert matrix.tolist() == expected
    s = metrics.per_label_scores(matrix)
    # precision = diag / column sums (4, 4, 2): A 3/4, B 2/4, C 1/2
    # recall    = diag / row sums    (5, 3, 2): A 3/5, B 2/3, C 1/2
    np.testing.assert_allclose(s.precision, [0.75, 0.5, 0.5])
    np.testing.assert_allclose(s.recall, [0.6, 2 / 3, 0.5])
    # F1: A 2*.75*.6/1.35 = 2/3; B 2*(1/2)(2/3)/(7/6) = 4/7; C 1/2
    np.testing.assert_allclose(s.f1, [2 / 3, 4 / 7, 0.5])
    assert s.support.tolist() == [5, 3, 2]
    # macro F1    = (2/3 + 4/7 + 1/2) / 3            = 73/126  ≈ 0.5794 (each label counts the same)
    # weighted F1 = (5*2/3 + 3*4/7 + 2*1/2) / 10     = 127/210 ≈ 0.6048 (big labels count more)
    assert metrics.macro_f1(matrix) == pytest.approx(73 / 126)
    assert metrics.weighted_f1(matrix) == pytest.approx(127 / 210)
    assert metrics.accuracy(matrix) == pytest.approx(0.6)


def test_macro_f1_ignores_labels_absent_from_truth_and_predictions() -> None:
    matrix = metrics.confusion_matrix(np.array([0, 1]), np.array([0, 1]), 4)
    assert metrics.macro_f1(matrix) == 1.0
    assert metrics.per_label_scores(matrix).precision.tolist() == [1.0, 1.0, 0.0, 0.0]  # zero_division=0


def test_hierarchical_prediction_counts_when_true_label_is_an_ancestor() -> None:
    from tagger.evaluation.cli import evaluate_attribute

    category = load_taxonomies(TAXONOMIES).attribute("category")
    keys = ("heels", "flats", "shirts")
    probabilities = np.array([[0.7, 0.2, 0.1],   # true footwear (a parent), predicted heels: right
                              [0.6, 0.3, 0.1],   # true flats, predicted heels: wrong
                              [0.1, 0.1, 0.8]])  # true shirts: right
    figures = evaluate_attribute(category, keys, probabilities, ["footwear", "flats", "shirts"], 0.5, 0.9)
    assert figures["accuracy"] == pytest.approx(2 / 3)
    assert figures["labels"] == ["footwear", "shirts", "heels", "flats"]  # taxonomy order, present labels only
    assert figures["top_k_accuracy"] == 1.0  # flats is second


# ---- calibration / thresholds ------------------------------------------------------------------------


def test_ece_toy_case() -> None:
    # bin (0.9, 1.0]: 4 products at confidence .95, 3 right -> |0.75 - 0.95| = 0.20
    # bin (0.5, 0.6]: 2 products at confidence .55, 1 right -> |0.50 - 0.55| = 0.05
    # ECE = (4*0.20 + 2*0.05) / 6 = 0.15
    rel = metrics.reliability(np.array([0.95] * 4 + [0.55] * 2), np.array([1, 1, 1, 0, 1, 0]), n_bins=10)
    assert rel.ece == pytest.approx(0.15)
    assert rel.count[9] == 4 and rel.count[5] == 2 and rel.count.sum() == 6
    assert rel.accuracy[9] == pytest.approx(0.75)
    assert np.isnan(rel.accuracy[0])
    # perfectly calibrated: confidence 0.5, half right; and edge values 0 and 1 land in the end bins
    assert metrics.reliability(np.array([0.5, 0.5]), np.array([1, 0])).ece == pytest.approx(0.0)
    edge = metrics.reliability(np.array([0.0, 1.0]), np.array([0, 1]), n_bins=4)
    assert edge.count.tolist() == [1, 0, 0, 1] and edge.ece == 0.0


def test_precision_coverage_monotone_case() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([1, 1, 1, 0, 0], dtype=bool)  # the right answers are the confident ones
    curve = metrics.precision_coverage(scores, correct, np.array([0.0, 0.55, 0.65, 0.75, 0.95]))
    np.testing.assert_allclose(curve.coverage, [1.0, 0.8, 0.6, 0.4, 0.0])
    np.testing.assert_allclose(curve.precision[:4], [0.6, 0.75, 1.0, 1.0])
    assert np.isnan(curve.precision[4])  # nothing accepted
    assert np.all(np.diff(curve.coverage) <= 0)  # coverage never rises with the threshold
    assert metrics.threshold_for_precision(scores, correct, 0.9) == pytest.approx(0.7)
    assert metrics.threshold_for_precision(scores, correct, 0.7) == pytest.approx(0.6)  # 3/4 accepted right
    assert metrics.threshold_for_precision(scores, ~correct, 0.9) is None
    # a threshold equal to a score accepts it (>=), as the service does
    assert metrics.precision_coverage(scores, correct, np.array([0.7])).accepted.tolist() == [3]


# ---- retrieval -----------------------------------------------------------------------------------------


def test_hits_and_mrr_on_a_toy_ranking() -> None:
    scores = np.array([[0.9, 0.1, 0.2, 0.3],   # own image first: rank 1
                       [0.8, 0.5, 0.1, 0.0],   # one candidate above: rank 2
                       [0.1, 0.2, 0.3, 0.4],   # rank 2
                       [0.9, 0.8, 0.7, 0.1]])  # last: rank 4
    ranks = metrics.ranks_of_relevant(scores)
    assert ranks.tolist() == [1, 2, 2, 4]
    assert metrics.hits_at_k(ranks, 1) == 0.25
    assert metrics.hits_at_k(ranks, 2) == 0.75
    assert metrics.hits_at_k(ranks, 5) == 1.0
    assert metrics.mean_reciprocal_rank(ranks) == pytest.approx((1 + 1 / 2 + 1 / 2 + 1 / 4) / 4)
    # ties count against the query: a constant model gets no free hits
    assert metrics.ranks_of_relevant(np.ones((3, 3))).tolist() == [3, 3, 3]
    assert metrics.ranks_of_relevant(scores, np.array([0, 0, 3, 0])).tolist() == [1, 1, 1, 1]


# ---- duplicates ------------------------------------------------------------------------------------------


def test_duplicate_threshold_sweep_and_suggestion() -> None:
    similarity = np.array([0.99, 0.97, 0.90, 0.95, 0.80, 0.50])
    is_dup = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    sweep = metrics.threshold_sweep(similarity, is_dup, np.array([0.5, 0.9, 0.96, 0.98, 1.0]))
    assert sweep.tp.tolist() == [3, 3, 2, 1, 0]
    assert sweep.fp.tolist() == [3, 1, 0, 0, 0]
    assert sweep.fn.tolist() == [0, 0, 1, 2, 3]
    np.testing.assert_allclose(sweep.precision[:4], [0.5, 0.75, 1.0, 1.0])
    assert np.isnan(sweep.precision[4])
    np.testing.assert_allclose(sweep.recall, [1, 1, 2 / 3, 1 / 3, 0])
    # F1 at 0.9: 2*.75*1/1.75 = 6/7; at 0.96: 2*1*(2/3)/(5/3) = 0.8
    np.testing.assert_allclose(sweep.f1[1:3], [6 / 7, 0.8])

    full = metrics.threshold_sweep(similarity, is_dup, metrics.grid(0.0, 1.0, 0.01))
    choice = metrics.suggest_threshold(full, min_precision=0.98)
    # precision reaches 1 once the negative at 0.95 is excluded: lowest such grid threshold is 0.96
    assert (choice.rule, choice.threshold) == ("precision", pytest.approx(0.96))
    assert choice.recall == pytest.approx(2 / 3)
    best = metrics.best_f1(full)
    assert best.threshold == pytest.approx(0.90) and best.f1 == pytest.approx(6 / 7)  # highest of the F1 ties
    # unreachable precision falls back to the best F1
    noisy = metrics.threshold_sweep(np.array([0.9, 0.9]), np.array([True, False]), metrics.grid(0, 1, 0.1))
    assert metrics.suggest_threshold(noisy, 0.98).rule == "f1"


def test_alterations_keep_images_valid() -> None:
    image = Image.new("RGB", (120, 160), (200, 30, 30))
    altered = alter_all(image, np.random.default_rng(0))
    assert set(altered) == set(ALTERATIONS)
    for name, out in altered.items():
        assert out.mode == "RGB" and min(out.size) > 50, name
    assert altered["pad"].size[0] > 120 and altered["crop"].size[0] < 120
    assert altered["hflip"].getpixel((0, 0)) == image.getpixel((119, 0))


# ---- data and mapping ---------------------------------------------------------------------------------


def test_mapping_files_and_unmapped_counts(tmp_path: Path) -> None:
    taxonomies = load_taxonomies(TAXONOMIES)
    mapping_file = tmp_path / "map.json"
    mapping_file.write_text(json.dumps({"Smart Casual": "casual", "Travel": None}))
    keys, info = map_labels(["Casual", "smart  casual", "Travel", "Picnic", None], taxonomies.attribute("style"),
                            load_mapping(mapping_file))
    assert keys == ["casual", "casual", None, None, None]
    assert (info["unmapped_count"], info["excluded_count"], info["missing_label"]) == (1, 1, 1)
    assert info["unmapped_values"] == {"Picnic": 1}
    bad = tmp_path / "bad.yaml"
    bad.write_text("Casual: not_a_label\n")
    with pytest.raises(DataError, match="not_a_label"):
        map_labels(["Casual"], taxonomies.attribute("style"), load_mapping(bad))
    for shipped in MAPPINGS.glob("kagl-*.yaml"):  # the shipped examples name real label keys
        mapping = load_mapping(shipped)
        attribute = taxonomies.attribute(mapping.attribute)
        assert {k for k in mapping.values.values() if k} <= {label.key for label in attribute.labels}, shipped


def test_hard_negatives_prefer_same_type_and_colour() -> None:
    frame = pd.DataFrame({"articleType": ["Shirts", "Shirts", "Shirts", "Jeans", "Jeans"],
                          "baseColour": ["Blue", "Blue", "Red", "Blue", "Blue"]})
    pairs = pick_negatives(frame, np.array([0, 3]), ["articleType", "baseColour"], 2, np.random.default_rng(0),
                           [b"a", b"b", b"c", b"d", b"d"])
    by_row = {(i, j): kind for i, j, kind in pairs}
    assert by_row[(0, 1)] == "same articleType+baseColour"
    assert by_row[(0, 2)] == "same articleType"
    assert (3, 4) not in by_row  # byte-identical images are real duplicates, never negatives
    assert all(i != j for i, j, _ in pairs)


# ---- end to end ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-product Parquet (image bytes + labels + split) from the sample catalog."""
    rows = []
    with (SAMPLES / "catalog.jsonl").open() as handle:
        records = [json.loads(line) for line in handle]
    for record in records[:12]:
        attrs = record["attributes"]
        rows.append({"id": record["sku"], "image": (SAMPLES / record["image"]).read_bytes(),
                     "articleType": attrs["articleType"], "baseColour": attrs.get("baseColour"),
                     "gender": attrs["gender"], "productDisplayName": record["title"],
                     "split": "val" if len(rows) < 10 else "train"})
    rows[0]["articleType"] = "Spacesuits"  # a value the taxonomy cannot map
    path = tmp_path_factory.mktemp("evalset") / "set.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


def _common(data: Path, tiny_clip_dir: Path, out: Path) -> list[str]:
    return ["--data", str(data), "--split", "val", "--model", str(tiny_clip_dir), "--device", "cpu",
            "--taxonomy-dir", str(TAXONOMIES), "--out", str(out)]


def test_zero_shot_end_to_end(tiny_set: Path, tiny_clip_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "zs"
    code = main(["zero-shot", *_common(tiny_set, tiny_clip_dir, out), "--attribute", "category",
                 "--label-column", "articleType", "--attribute", "gender", "--label-column", "gender"])
    assert code == 0
    result = json.loads((out / "zero-shot.json").read_text())
    assert result["run"]["rows"] == 10  # split filter
    category = result["attributes"]["category"]
    assert category["evaluated"] == 9 and category["unmapped_count"] == 1
    assert category["unmapped_values"] == {"Spacesuits": 1}
    for key in ("accuracy", "weighted_f1", "macro_f1", "ece", "per_label", "threshold", "precision_coverage",
                "reliability", "plots"):
        assert key in category
    assert {"threshold_for_target", "configured", "coverage_at_configured"} <= set(category["threshold"])
    for name in ("category", "gender"):
        for png in result["attributes"][name]["plots"].values():
            assert (out / png).stat().st_size > 1000
        assert (out / f"confusion-{name}.csv").is_file()
    text = (out / "report.md").read_text()
    assert "](confusion-category.png)" in text and "## gender" in text


def test_retrieval_end_to_end_from_csv(tiny_set: Path, tiny_clip_dir: Path, tmp_path: Path) -> None:
    # CSV with image paths relative to --image-root
    frame = pd.read_parquet(tiny_set)
    images = tmp_path / "imgs"
    images.mkdir()
    for row in frame.itertuples():
        (images / f"{row.id}.jpg").write_bytes(row.image)
    csv = tmp_path / "set.csv"
    frame.drop(columns=["image"]).assign(path=[f"{i}.jpg" for i in frame.id]).to_csv(csv, index=False)
    out = tmp_path / "rt"
    code = main(["retrieval", *_common(csv, tiny_clip_dir, out), "--image-column", "path", "--image-root", str(images),
                 "--group-column", "articleType"])
    assert code == 0
    r = json.loads((out / "retrieval.json").read_text())["retrieval"]
    assert r["queries"] == 10
    for key in ("hits@1", "hits@5", "hits@10", "mrr"):
        assert 0.0 <= r[key] <= 1.0
    assert r["hits@1"] <= r["hits@5"] <= r["hits@10"] == 1.0  # only 10 candidates
    assert (out / "report.md").is_file() and (out / "hits-at-k.png").is_file()


def test_duplicates_end_to_end(tiny_set: Path, tiny_clip_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "dup"
    code = main(["duplicates", *_common(tiny_set, tiny_clip_dir, out), "--originals", "4",
                 "--negatives-per-image", "3"])
    assert code == 0
    d = json.loads((out / "duplicates.json").read_text())["duplicates"]
    assert d["positives"] == 4 * len(ALTERATIONS) and d["negatives"] > 0
    assert set(d["by_alteration"]) == set(ALTERATIONS)
    for key in ("threshold", "rule", "precision", "recall", "f1"):
        assert key in d["suggested"]
    assert 0.0 <= d["suggested"]["threshold"] <= 1.0
    assert (out / "duplicates-threshold.png").is_file()
    assert "TAGGER_DUPLICATE_THRESHOLD" in (out / "report.md").read_text()


def test_bad_input_is_a_clear_error(tiny_set: Path, tiny_clip_dir: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["zero-shot", *_common(tiny_set, tiny_clip_dir, tmp_path), "--attribute", "category",
                 "--label-column", "nope"])
    assert code == 2 and "nope" in capsys.readouterr().err
    with pytest.raises(DataError, match="split"):
        load_eval_data(tiny_set, split="test")
