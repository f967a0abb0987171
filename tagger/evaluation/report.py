"""Plots (PNG, matplotlib's Agg backend) and the Markdown report of ``tagger eval``.

The report is written from the same result dictionary as the JSON file, so the two always agree.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tagger.evaluation import metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# ---- files -----------------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return None if math.isnan(f) or math.isinf(f) else round(f, 6)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.write_text(json.dumps(jsonable(result), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_confusion_csv(path: Path, matrix: np.ndarray, labels: Sequence[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *labels])
        for label, row in zip(labels, matrix):
            writer.writerow([label, *(int(v) for v in row)])


# ---- plots -----------------------------------------------------------------------------------------


def plot_confusion(path: Path, matrix: np.ndarray, labels: Sequence[str], title: str) -> None:
    """Row-normalised colours (recall per true label); raw counts written in cells when it stays legible."""
    plt = _pyplot()
    n = len(labels)
    size = min(24.0, max(5.0, 0.38 * n + 2.5))
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    rows = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=8 if n > 20 else 10)
    ax.set_yticks(range(n), labels, fontsize=8 if n > 20 else 10)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true label's products")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(path: Path, rel: metrics.Reliability, title: str) -> None:
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(5.5, 6.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    centres = (rel.edges[:-1] + rel.edges[1:]) / 2
    width = rel.edges[1] - rel.edges[0]
    ax.bar(centres, np.nan_to_num(rel.accuracy), width=width * 0.9, color="#4c72b0", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(centres, rel.confidence, "o", color="#dd8452", label="mean confidence")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} (ECE {rel.ece:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    ax2.bar(centres, rel.count, width=width * 0.9, color="#8c8c8c")
    ax2.set_xlabel("top-1 probability")
    ax2.set_ylabel("products")
    ax2.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_precision_coverage(path: Path, curve: metrics.CoverageCurve, title: str, current: float | None,
                            suggested: float | None, target: float) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(curve.thresholds, curve.precision, label="precision of accepted tags", color="#4c72b0")
    ax.plot(curve.thresholds, curve.coverage, label="coverage (share accepted)", color="#55a868")
    ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target precision {target:g}")
    if current is not None:
        ax.axvline(current, color="#c44e52", linestyle="--", linewidth=1, label=f"configured threshold {current:g}")
    if suggested is not None:
        ax.axvline(suggested, color="#8172b2", linestyle="-.", linewidth=1, label=f"threshold for target {suggested:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("threshold on the top-1 probability")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_threshold_sweep(path: Path, sweep: metrics.ThresholdSweep, choice: metrics.ThresholdChoice,
                         current: float | None, positives: np.ndarray, negatives: np.ndarray) -> None:
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    ax.plot(sweep.thresholds, sweep.precision, label="precision", color="#4c72b0")
    ax.plot(sweep.thresholds, sweep.recall, label="recall", color="#55a868")
    ax.plot(sweep.thresholds, sweep.f1, label="F1", color="#c44e52")
    ax.axvline(choice.threshold, color="#8172b2", linestyle="-.", label=f"suggested {choice.threshold:.4g}")
    if current is not None:
        ax.axvline(current, color="grey", linestyle="--", label=f"configured {current:g}")
    ax.set_ylim(0, 1.02)
    ax.set_title("near-duplicates: pair precision / recall vs similarity threshold")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    bins = np.linspace(min(float(np.min(positives, initial=1.0)), float(np.min(negatives, initial=1.0)), 1.0), 1.0, 60) \
        if len(positives) + len(negatives) else 10
    ax2.hist(negatives, bins=bins, alpha=0.6, label="hard negatives", color="#c44e52")
    ax2.hist(positives, bins=bins, alpha=0.6, label="altered copies", color="#55a868")
    ax2.set_xlabel("cosine similarity of image embeddings")
    ax2.set_ylabel("pairs")
    ax2.legend(fontsize=8)
    lo = float(min(np.min(positives, initial=1.0), np.min(negatives, initial=1.0)))
    ax2.set_xlim(max(0.0, lo - 0.02), 1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ranks(path: Path, ks: Sequence[int], hits: Sequence[float], title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(list(ks), list(hits), marker="o")
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("HITS@k")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- markdown --------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(v, digits).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


def _header(result: dict[str, Any], title: str) -> list[str]:
    run = result["run"]
    lines = [f"# {title}", "",
             f"- model: `{run['model_id']}` (spec `{run['model']}`, logit scale {run['logit_scale']:g})",
             f"- data: `{run['data']}`" + (f", split `{run['split']}`" if run.get("split") else "")
             + f", {run['rows']} product(s) with an image" + (f" (random subset, seed {run['seed']})" if run.get("limit") else ""),
             f"- command: `{run['command_line']}`",
             f"- written: {run['created']}"]
    if run.get("skipped"):
        lines.append("- rows left out while loading: " + ", ".join(f"{k}: {v}" for k, v in run["skipped"].items()))
    return lines + [""]


def zero_shot_markdown(result: dict[str, Any]) -> str:
    out = _header(result, "Zero-shot tagging evaluation")
    out += ["Each product is scored exactly as the service does: label prototypes from the taxonomy prompts "
            "(`scoring.build_prototypes`), softmax of `logit_scale x cosine` over the attribute's labels "
            "(`scoring.label_probabilities`), top-1 label as the prediction. For hierarchical attributes only "
            "leaves are predicted, and a prediction counts as correct when the true label is the predicted "
            "leaf or one of its ancestors. `applies_to` conditions are not applied: every product with a "
            "mapped label is scored.", ""]
    summary = [[name, a["label_column"], a["evaluated"], a["unmapped_count"], a["accuracy"], a["weighted_f1"],
                a["macro_f1"], a.get("top_k_accuracy"), a["ece"]] for name, a in result["attributes"].items()]
    out += ["## Summary", "", table(["attribute", "column", "evaluated", "unmapped", "accuracy", "weighted F1",
                                     "macro F1", "top-k acc.", "ECE"], summary), ""]
    for name, a in result["attributes"].items():
        th = a["threshold"]
        out += [f"## {name} (column `{a['label_column']}`)", ""]
        out += [f"- mapping: {('`' + a['mapping'] + '`') if a['mapping'] else 'taxonomy keys, names and synonyms (`Attribute.match_value`)'}",
                f"- evaluated: {a['evaluated']} product(s); no value in the column: {a['missing_label']}; "
                f"value not mapped to a label: {a['unmapped_count']}; excluded by the mapping (null): {a['excluded_count']}"]
        if a["unmapped_values"]:
            top = list(a["unmapped_values"].items())[:15]
            out.append("- unmapped values (count): " + ", ".join(f"{k} ({v})" for k, v in top)
                       + (" …" if len(a["unmapped_values"]) > 15 else ""))
        out += [f"- accuracy {_fmt(a['accuracy'])}, weighted F1 {_fmt(a['weighted_f1'])}, macro F1 "
                f"{_fmt(a['macro_f1'])}, top-{a['top_k']} accuracy {_fmt(a['top_k_accuracy'])}", ""]
        out += ["### Threshold", "",
                f"Configured threshold {_fmt(th['configured'])}: {_fmt(th['coverage_at_configured'])} of products "
                f"get an accepted tag, with precision {_fmt(th['precision_at_configured'])}; the rest go to review.",
                "",
                (f"Smallest threshold reaching precision {th['target_precision']:g}: **{_fmt(th['threshold_for_target'])}** "
                 f"(coverage {_fmt(th['coverage_at_target'])})." if th["threshold_for_target"] is not None else
                 f"No threshold reaches precision {th['target_precision']:g} on this data."), "",
                f"![precision vs coverage]({a['plots']['precision_coverage']})", "",
                table(["threshold", "coverage", "precision", "accepted"],
                      [[p["threshold"], p["coverage"], p["precision"], p["accepted"]] for p in a["precision_coverage"]
                       if round(p["threshold"] * 100) % 10 == 0 or p["threshold"] in (0.05, 0.95)]), ""]
        out += ["### Calibration", "", f"Expected calibration error (10 bins): {_fmt(a['ece'])}.", "",
                f"![reliability diagram]({a['plots']['reliability']})", ""]
        out += ["### Confusion matrix", "", f"Counts: [`{a['confusion_csv']}`]({a['confusion_csv']}).", "",
                f"![confusion matrix]({a['plots']['confusion']})", ""]
        if a["top_confusions"]:
            out += ["Most frequent confusions:", "",
                    table(["true", "predicted", "products"], [[c["true"], c["predicted"], c["count"]]
                                                               for c in a["top_confusions"]]), ""]
        out += ["### Per label", "",
                table(["label", "precision", "recall", "F1", "support", "predicted"],
                      [[p["label"], p["precision"], p["recall"], p["f1"], p["support"], p["predicted"]]
                       for p in a["per_label"] if p["support"] or p["predicted"]]), ""]
    return "\n".join(out) + "\n"


def retrieval_markdown(result: dict[str, Any]) -> str:
    out = _header(result, "Text-to-image retrieval evaluation")
    r = result["retrieval"]
    out += ["Protocol of the FashionCLIP paper: each product's text is a query, every image of the set is a "
            "candidate, and the product's own image is the only relevant one. Ties are counted against the "
            "query; products whose titles are identical still compete with each other, so the figures are a "
            "lower bound.", "",
            f"- queries: {r['queries']} (text column `{r['text_column']}`; {r['missing_text']} product(s) without text left out)",
            f"- identical titles: {r['duplicate_titles']} product(s) share their title with another one", "",
            table(["HITS@1", "HITS@5", "HITS@10", "MRR", "median rank"],
                  [[r["hits@1"], r["hits@5"], r["hits@10"], r["mrr"], r["median_rank"]]]), "",
            f"![HITS@k]({r['plots']['hits']})", ""]
    if r.get("by_group"):
        out += [f"### By `{r['group_column']}` (queries ranked against all candidates)", "",
                table(["group", "queries", "HITS@1", "HITS@10", "MRR"],
                      [[g["group"], g["queries"], g["hits@1"], g["hits@10"], g["mrr"]] for g in r["by_group"]]), ""]
    if r.get("examples"):
        out += ["### Hardest queries (own image ranked lowest)", "",
                table(["query", "rank", "top-1 product"], [[e["query"], e["rank"], e["top1"]] for e in r["examples"]]), ""]
    return "\n".join(out) + "\n"


def duplicates_markdown(result: dict[str, Any]) -> str:
    out = _header(result, "Near-duplicate detection evaluation")
    d = result["duplicates"]
    s = d["suggested"]
    out += [f"Positives: {d['positives']} pairs (original, altered copy) from {d['originals']} images and the "
            f"alterations {', '.join(d['alterations'])}. Negatives: {d['negatives']} pairs of distinct products "
            f"chosen as hard as possible ({', '.join(f'{k}: {v}' for k, v in d['negative_kinds'].items())}).", "",
            "**Rule for the suggested threshold:** the lowest similarity threshold at which pair precision reaches "
            f"{d['min_precision']:g} (the lowest such threshold has the best recall, since recall only falls as the "
            "threshold rises); when no threshold reaches it, the threshold with the best F1.", "",
            f"**Suggested `TAGGER_DUPLICATE_THRESHOLD={s['threshold']:.4g}`** (rule: {s['rule']}): precision "
            f"{_fmt(s['precision'])}, recall {_fmt(s['recall'])}, F1 {_fmt(s['f1'])}. Best F1 is {_fmt(d['best_f1']['f1'])} "
            f"at {d['best_f1']['threshold']:.4g}. The configured threshold {d['configured_threshold']:g} gives precision "
            f"{_fmt(d['at_configured']['precision'])}, recall {_fmt(d['at_configured']['recall'])}, F1 "
            f"{_fmt(d['at_configured']['f1'])}.", "",
            f"![precision / recall vs threshold]({d['plots']['sweep']})", "",
            "Recall per alteration at the suggested threshold:", "",
            table(["alteration", "pairs", "recall", "median similarity"],
                  [[k, v["pairs"], v["recall"], v["median_similarity"]] for k, v in d["by_alteration"].items()]), ""]
    if d.get("suspect_negatives"):
        out += [f"{d['suspect_negatives']} negative pair(s) have similarity ≥ 0.99: they are probably the same "
                "photo listed under two product ids (a true duplicate in the data), which lowers the measured "
                "precision, or the model cannot tell these products apart.", ""]
    out += ["### Sweep", "", table(["threshold", "precision", "recall", "F1", "TP", "FP", "FN"],
                                   [[p["threshold"], p["precision"], p["recall"], p["f1"], p["tp"], p["fp"], p["fn"]]
                                    for p in d["sweep_table"]]), ""]
    return "\n".join(out) + "\n"
