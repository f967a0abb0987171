"""`tagger eval ...`: measure the tagger on a labelled product set before trusting it.

Subcommands:

* ``zero-shot``  – tag accuracy / F1 / calibration / threshold choice for one or more attributes; with
  ``--shots 0,1,5,10,25``: the same with K exemplars per label (``tagger/evaluation/shots.py``);
* ``retrieval``  – text-to-image HITS@k and MRR (FashionCLIP paper protocol);
* ``duplicates`` – precision/recall of near-duplicate detection vs the similarity threshold, and a
  suggested ``TAGGER_DUPLICATE_THRESHOLD``.

Each run writes ``<out>/<command>.json`` and ``<out>/report.md`` plus PNG plots and CSV files
(default ``out/eval/<command>/``). Examples::

    tagger eval zero-shot --data /work/shared/data/kagl --split val \\
        --attribute category --label-column articleType --mapping tagger/evaluation/mappings/kagl-category.yaml
    tagger eval retrieval --data products.parquet --text-column title
    tagger eval duplicates --data products.csv --image-column image_path --image-root images/
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tagger.evaluation import metrics, report
from tagger.errors import TaggerError
from tagger.evaluation.data import DataError, EvalData, LabelMapping, load_eval_data, load_mapping

MAPPINGS_DIR = Path(__file__).resolve().parent / "mappings"
RETRIEVAL_KS = (1, 5, 10)


# ---- shared ----------------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data", required=True, help="a .parquet/.csv/.jsonl file, or a directory (KAGL layout: "
                                                 "styles.parquet + images-*.parquet joined on id)")
    g.add_argument("--image-column", default="image", help="image bytes or a path (default: image)")
    g.add_argument("--image-root", help="folder that relative image paths start from (default: the data file's folder)")
    g.add_argument("--join-column", default="id", help="id column joining metadata and image shards (default: id)")
    g.add_argument("--split-column", default="split", help="column holding the split name (default: split)")
    g.add_argument("--split", help="keep only rows of this split (e.g. val)")
    g.add_argument("--limit", type=int, help="evaluate a random subset of N products (drawn with --seed)")
    g.add_argument("--seed", type=int, default=0, help="random seed for --limit and sampling (default: 0)")
    g = parser.add_argument_group("model and output")
    g.add_argument("--model", help="model spec (default: TAGGER_MODEL, i.e. 'default')")
    g.add_argument("--device", help="auto | cpu | cuda (default: TAGGER_DEVICE)")
    g.add_argument("--batch-size", type=int, default=32, help="images per encoder batch (default: 32)")
    g.add_argument("--taxonomy-dir", help="taxonomy folder (default: TAGGER_TAXONOMY_DIR)")
    g.add_argument("--out", help="output folder (default: out/eval/<command>)")


def _command_line(argv: Sequence[str]) -> str:
    return "tagger eval " + shlex.join(list(argv))


def _load(args: argparse.Namespace) -> EvalData:
    if args.limit is not None and args.limit < 1:
        raise DataError("--limit must be at least 1")
    return load_eval_data(args.data, image_column=args.image_column, image_root=args.image_root,
                          split_column=args.split_column, split=args.split, limit=args.limit, seed=args.seed,
                          join_column=args.join_column)


def _encoder(args: argparse.Namespace):  # noqa: ANN202
    from tagger.encoders.base import get_encoder
    from tagger.settings import get_settings

    settings = get_settings()
    return get_encoder(args.model or settings.model, args.device or settings.device)


def _run_info(args: argparse.Namespace, argv: Sequence[str], encoder, data: EvalData) -> dict[str, Any]:
    from tagger.settings import get_settings

    return {"command": args.command, "command_line": _command_line(argv),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": args.model or get_settings().model, "model_id": encoder.model_id,
            "logit_scale": float(encoder.logit_scale), "data": data.source, "split": args.split, "limit": args.limit,
            "seed": args.seed, "rows": len(data), "skipped": data.skipped}


def _out_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out) if args.out else Path("out") / "eval" / args.command
    out.mkdir(parents=True, exist_ok=True)
    return out


def _finish(out: Path, name: str, result: dict[str, Any], markdown: str) -> None:
    report.write_json(out / f"{name}.json", result)
    (out / "report.md").write_text(markdown, encoding="utf-8")
    print(f"wrote {out / 'report.md'} and {out / (name + '.json')}", file=sys.stderr)


def _drop_failed(data: EvalData, vectors: np.ndarray, ok: np.ndarray) -> tuple[EvalData, np.ndarray]:
    if ok.all():
        return data, vectors
    data = data.subset(np.flatnonzero(ok))
    data.skipped["image not decodable"] = int((~ok).sum())
    return data, vectors[ok]


# ---- zero-shot -------------------------------------------------------------------------------------


def _mapping_for(attribute: str, column: str, mappings: list[LabelMapping], n_attributes: int) -> LabelMapping | None:
    named = [m for m in mappings if m.attribute == attribute and (m.column is None or m.column == column)]
    if named:
        return named[0]
    unnamed = [m for m in mappings if m.attribute is None]
    if n_attributes == 1 and unnamed:
        return unnamed[0]
    return None


def map_labels(values: Sequence[object], attribute, mapping: LabelMapping | None
               ) -> tuple[list[str | None], dict[str, Any]]:
    """Each dataset value to a label key (None: not evaluated), with counts of why rows were left out."""
    known = {label.key for label in attribute.labels}
    if mapping is not None:
        bad = sorted({k for k in mapping.values.values() if k is not None and k not in known})
        if bad:
            raise DataError(f"{mapping.source}: {', '.join(bad)} not label key(s) of attribute {attribute.name!r}; "
                            f"known keys: {', '.join(sorted(known))}")
    cache: dict[str, tuple[str, str | None]] = {}
    keys: list[str | None] = []
    unmapped: Counter[str] = Counter()
    excluded: Counter[str] = Counter()
    missing = 0
    for value in values:
        if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
            keys.append(None)
            missing += 1
            continue
        text = str(value)
        if text not in cache:
            status, key = "unmapped", None
            if mapping is not None:
                found, key = mapping.lookup(text)
                if found:
                    status = "mapped" if key is not None else "excluded"
            if status == "unmapped":
                label = attribute.match_value(text)
                if label is not None:
                    status, key = "mapped", label.key
            cache[text] = (status, key)
        status, key = cache[text]
        if status == "unmapped":
            unmapped[text] += 1
        elif status == "excluded":
            excluded[text] += 1
        keys.append(key)
    info = {"missing_label": missing, "unmapped_count": sum(unmapped.values()),
            "unmapped_values": dict(unmapped.most_common()), "excluded_count": sum(excluded.values()),
            "excluded_values": dict(excluded.most_common())}
    return keys, info


def evaluate_attribute(attribute, keys: tuple[str, ...], probabilities: np.ndarray, true_keys: Sequence[str],
                       configured_threshold: float, target_precision: float) -> dict[str, Any]:
    """All zero-shot figures of one attribute from its probabilities (rows: products with a true label)."""
    n = len(true_keys)
    order = np.argsort(-probabilities, axis=1, kind="stable")
    top1 = order[:, 0]
    confidence = probabilities[np.arange(n), top1]
    pred_keys = [keys[int(i)] for i in top1]
    ancestors_cache: dict[str, set[str]] = {}

    def correct_for(pred: str, true: str) -> bool:
        if pred not in ancestors_cache:
            ancestors_cache[pred] = set(attribute.ancestors(pred))
        return true in ancestors_cache[pred]

    correct = np.array([correct_for(p, t) for p, t in zip(pred_keys, true_keys)], dtype=bool)
    top_k = min(attribute.top_k or 3, len(keys))
    topk_correct = np.array([any(correct_for(keys[int(j)], t) for j in order[i, :top_k])
                             for i, t in enumerate(true_keys)], dtype=bool)
    # A correct prediction of a descendant leaf counts as the true (ancestor) label itself.
    effective = [t if c else p for p, t, c in zip(pred_keys, true_keys, correct)]
    present = set(true_keys) | set(effective)
    labels = [label.key for label in attribute.labels if label.key in present]
    index = {k: i for i, k in enumerate(labels)}
    y_true = np.array([index[k] for k in true_keys], dtype=np.int64)
    y_pred = np.array([index[k] for k in effective], dtype=np.int64)
    matrix = metrics.confusion_matrix(y_true, y_pred, len(labels))
    scores = metrics.per_label_scores(matrix)
    rel = metrics.reliability(confidence, correct, n_bins=10)
    thresholds = metrics.grid(0.0, 1.0, 0.01)
    curve = metrics.precision_coverage(confidence, correct, thresholds)
    at_conf = metrics.precision_coverage(confidence, correct, np.array([configured_threshold]))
    target = metrics.threshold_for_precision(confidence, correct, target_precision)
    at_target = metrics.precision_coverage(confidence, correct, np.array([target])) if target is not None else None
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:10]
    confusions = [{"true": labels[i], "predicted": labels[j], "count": int(off[i, j])}
                  for i, j in zip(*np.unravel_index(flat, off.shape)) if off[i, j] > 0]
    return {
        "evaluated": n,
        "accuracy": metrics.accuracy(matrix), "weighted_f1": metrics.weighted_f1(matrix),
        "macro_f1": metrics.macro_f1(matrix), "top_k": top_k,
        "top_k_accuracy": float(topk_correct.mean()) if n else 0.0, "ece": rel.ece,
        "labels": labels,
        "per_label": [{"label": k, "name": attribute.label(k).name, "precision": scores.precision[i],
                       "recall": scores.recall[i], "f1": scores.f1[i], "support": scores.support[i],
                       "predicted": scores.predicted[i]} for i, k in enumerate(labels)],
        "top_confusions": confusions,
        "threshold": {"configured": configured_threshold, "precision_at_configured": at_conf.precision[0],
                      "coverage_at_configured": at_conf.coverage[0], "target_precision": target_precision,
                      "threshold_for_target": target,
                      "coverage_at_target": at_target.coverage[0] if at_target is not None else None},
        "precision_coverage": [{"threshold": t, "coverage": c, "precision": p, "accepted": a} for t, c, p, a in
                               zip(curve.thresholds, curve.coverage, curve.precision, curve.accepted)],
        "reliability": [{"low": rel.edges[i], "high": rel.edges[i + 1], "count": rel.count[i],
                         "confidence": rel.confidence[i], "accuracy": rel.accuracy[i]} for i in range(len(rel.count))],
        "_matrix": matrix, "_reliability": rel, "_curve": curve,
    }


def cmd_zero_shot(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from tagger.scoring import build_prototypes, label_probabilities
    from tagger.settings import get_settings
    from tagger.taxonomy import load_taxonomies

    if args.shots is not None:
        from tagger.evaluation.shots import run

        return run(args, argv)
    settings = get_settings()
    attributes = args.attribute
    columns = args.label_column
    if len(attributes) != len(columns):
        raise DataError("give one --label-column per --attribute, in the same order")
    taxonomies = load_taxonomies(Path(args.taxonomy_dir) if args.taxonomy_dir else settings.taxonomy_dir)
    known = [a.name for a in taxonomies.attributes]
    for name in attributes:
        if name not in known:
            raise DataError(f"attribute {name!r} is not in the taxonomies; known: {', '.join(known)}")
    mappings = [load_mapping(p) for p in args.mapping or []]
    text_weight = settings.text_weight if args.text_weight is None else args.text_weight
    if text_weight > 0 and not args.text_column:
        print(f"note: text weight {text_weight:g} ignored: give --text-column to mix product texts into the score "
              "as the service does", file=sys.stderr)
        text_weight = 0.0

    data = _load(args)
    targets: dict[str, tuple[list[str | None], dict[str, Any], LabelMapping | None]] = {}
    for name, column in zip(attributes, columns):
        mapping = _mapping_for(name, column, mappings, len(attributes))
        keys, info = map_labels(data.column(column).tolist(), taxonomies.attribute(name), mapping)
        targets[name] = (keys, info, mapping)
    needed = np.zeros(len(data), dtype=bool)
    for keys, _, _ in targets.values():
        needed |= np.array([k is not None for k in keys], dtype=bool)
    if not needed.any():
        raise DataError("no product has a label that maps to the taxonomy; give a --mapping file")
    encoder = _encoder(args)
    rows = np.flatnonzero(needed)
    subset = data.subset(rows)
    vectors, ok = _embed(encoder, subset, args.batch_size)
    text_vectors = None
    if text_weight > 0 and args.text_column:
        from tagger.evaluation.data import embed_texts

        texts = subset.column(args.text_column).fillna("").astype(str).tolist()
        text_vectors = embed_texts(encoder, texts)
    prototypes = build_prototypes(taxonomies, encoder.encode_texts)

    out = _out_dir(args)
    result: dict[str, Any] = {"run": _run_info(args, argv, encoder, data), "text_weight": text_weight,
                              "text_column": args.text_column if text_weight > 0 else None, "attributes": {}}
    for name, column in zip(attributes, columns):
        attribute = taxonomies.attribute(name)
        keys_all, info, mapping = targets[name]
        keys_sub = [keys_all[r] for r in rows]
        keep = np.array([k is not None for k in keys_sub], dtype=bool) & ok
        if not keep.any():
            raise DataError(f"attribute {name!r}: no product with a mapped label in column {column!r}")
        proto = prototypes[name]
        probs = label_probabilities(vectors[keep], proto.vectors, encoder.logit_scale,
                                    text_vectors[keep] if text_vectors is not None else None, text_weight)
        configured = attribute.threshold if attribute.threshold is not None else settings.review_threshold
        figures = evaluate_attribute(attribute, proto.keys, probs, [k for k, m in zip(keys_sub, keep) if m],
                                     configured, args.target_precision)
        matrix, rel, curve = figures.pop("_matrix"), figures.pop("_reliability"), figures.pop("_curve")
        plots = {"confusion": f"confusion-{name}.png", "reliability": f"reliability-{name}.png",
                 "precision_coverage": f"precision-coverage-{name}.png"}
        report.write_confusion_csv(out / f"confusion-{name}.csv", matrix, figures["labels"])
        report.plot_confusion(out / plots["confusion"], matrix, figures["labels"],
                              f"{name} ({column}): accuracy {figures['accuracy']:.3f}")
        report.plot_reliability(out / plots["reliability"], rel, f"{name}: reliability")
        report.plot_precision_coverage(out / plots["precision_coverage"], curve, f"{name}: precision vs coverage",
                                       configured, figures["threshold"]["threshold_for_target"], args.target_precision)
        result["attributes"][name] = {"label_column": column, "mapping": mapping.source if mapping else None,
                                      **info, **figures, "confusion_csv": f"confusion-{name}.csv", "plots": plots}
        print(f"{name:<14} n={figures['evaluated']:<6} accuracy {figures['accuracy']:.3f}  weighted F1 "
              f"{figures['weighted_f1']:.3f}  macro F1 {figures['macro_f1']:.3f}  ECE {figures['ece']:.3f}  "
              f"unmapped {info['unmapped_count']}")
    _finish(out, "zero-shot", result, report.zero_shot_markdown(report.jsonable(result)))
    return 0


def _embed(encoder, data: EvalData, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    from tagger.evaluation.data import embed_images

    return embed_images(encoder, data, batch_size=batch_size)


# ---- retrieval -------------------------------------------------------------------------------------


def cmd_retrieval(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from tagger.evaluation.data import embed_texts

    data = _load(args)
    texts_all = data.column(args.text_column)
    has_text = texts_all.notna() & (texts_all.astype(str).str.strip() != "")
    missing_text = int((~has_text).sum())
    data = data.subset(np.flatnonzero(has_text.to_numpy()))
    if len(data) < 2:
        raise DataError("retrieval needs at least two products with an image and a text")
    encoder = _encoder(args)
    images, ok = _embed(encoder, data, args.batch_size)
    data, images = _drop_failed(data, images, ok)
    texts = data.column(args.text_column).astype(str).str.strip().tolist()
    queries = embed_texts(encoder, texts)
    scores = queries @ images.T
    ranks = metrics.ranks_of_relevant(scores)
    counts = Counter(t.lower() for t in texts)
    ks = [k for k in (1, 2, 5, 10, 20, 50, 100) if k <= len(data)] or [1]
    curve = [metrics.hits_at_k(ranks, k) for k in ks]
    out = _out_dir(args)
    retrieval: dict[str, Any] = {
        "text_column": args.text_column, "queries": len(data), "candidates": len(data), "missing_text": missing_text,
        "duplicate_titles": int(sum(c for c in counts.values() if c > 1)),
        **{f"hits@{k}": metrics.hits_at_k(ranks, k) for k in RETRIEVAL_KS},
        "mrr": metrics.mean_reciprocal_rank(ranks), "median_rank": float(np.median(ranks)),
        "hits_curve": {str(k): h for k, h in zip(ks, curve)}, "plots": {"hits": "hits-at-k.png"},
    }
    if args.group_column and args.group_column in data.frame.columns:
        groups = np.array([_text(v) for v in data.frame[args.group_column]], dtype=object)
        by_group = []
        for g, n in Counter(groups).most_common(20):
            r = ranks[groups == g]
            by_group.append({"group": g, "queries": n, "hits@1": metrics.hits_at_k(r, 1),
                             "hits@10": metrics.hits_at_k(r, 10), "mrr": metrics.mean_reciprocal_rank(r)})
        retrieval["group_column"] = args.group_column
        retrieval["by_group"] = by_group
    worst = np.argsort(-ranks, kind="stable")[:10]
    retrieval["examples"] = [{"query": texts[i], "rank": int(ranks[i]), "top1": texts[int(np.argmax(scores[i]))]}
                             for i in worst]
    report.plot_ranks(out / "hits-at-k.png", ks, curve, f"text→image retrieval, {len(data)} candidates")
    result = {"run": _run_info(args, argv, encoder, data), "retrieval": retrieval}
    print(f"retrieval n={len(data)}  HITS@1 {retrieval['hits@1']:.3f}  HITS@5 {retrieval['hits@5']:.3f}  "
          f"HITS@10 {retrieval['hits@10']:.3f}  MRR {retrieval['mrr']:.3f}")
    _finish(out, "retrieval", result, report.retrieval_markdown(report.jsonable(result)))
    return 0


# ---- duplicates ------------------------------------------------------------------------------------


def pick_negatives(frame, originals: np.ndarray, group_columns: Sequence[str], per_image: int,
                   rng: np.random.Generator, image_keys: Sequence[object]) -> list[tuple[int, int, str]]:
    """(original row, other row, kind) pairs of distinct products, hardest first.

    Partners share every group column (e.g. articleType and baseColour) when possible, else the first
    group column only, else any product. Pairs whose image bytes/paths are identical are skipped: they
    are real duplicates, not negatives.
    """
    n = len(frame)
    levels: list[tuple[str, np.ndarray]] = []
    cols = [c for c in group_columns if c in frame.columns]
    if cols:
        full = np.array(["\u0001".join(_text(v) for v in row) for row in frame[cols].itertuples(index=False)],
                        dtype=object)
        levels.append(("same " + "+".join(cols), full))
        if len(cols) > 1:
            levels.append((f"same {cols[0]}", np.array([_text(v) for v in frame[cols[0]]], dtype=object)))
    members: list[dict[str, np.ndarray]] = []
    for _, keys in levels:
        groups: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(k, []).append(i)
        members.append({k: np.asarray(v) for k, v in groups.items()})
    pairs: list[tuple[int, int, str]] = []
    for row in originals:
        row = int(row)
        chosen: list[int] = []
        kinds: list[str] = []
        for (kind, keys), groups in zip(levels, members):
            if len(chosen) >= per_image:
                break
            pool = [int(j) for j in groups[keys[row]] if j != row and j not in chosen]
            take = rng.permutation(pool)[: per_image - len(chosen)] if pool else []
            chosen.extend(int(j) for j in take)
            kinds.extend([kind] * len(take))
        while len(chosen) < per_image and len(chosen) < n - 1:
            j = int(rng.integers(n))
            if j != row and j not in chosen:
                chosen.append(j)
                kinds.append("random")
        for j, kind in zip(chosen, kinds):
            if _same_image(image_keys[row], image_keys[j]):
                continue
            pairs.append((row, j, kind))
    return pairs


def _text(value: object) -> str:
    """A group key; every missing value (None, NaN, NA) becomes "(missing)"."""
    try:
        if value is None or bool(pd.isna(value)):
            return "(missing)"
    except (TypeError, ValueError):
        pass
    return str(value)


def _same_image(a: object, b: object) -> bool:
    if isinstance(a, dict):
        a = a.get("bytes") or a.get("path")
    if isinstance(b, dict):
        b = b.get("bytes") or b.get("path")
    return type(a) is type(b) and a == b


def _floored(choice: metrics.ThresholdChoice, similarity: np.ndarray, is_dup: np.ndarray) -> metrics.ThresholdChoice:
    value = float(np.floor(choice.threshold * 10_000) / 10_000)
    at = metrics.threshold_sweep(similarity, is_dup, np.array([value]))
    return metrics.ThresholdChoice(value, choice.rule, float(np.nan_to_num(at.precision[0])), float(at.recall[0]),
                                   float(at.f1[0]))


def cmd_duplicates(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from tagger.evaluation.alterations import ALTERATIONS
    from tagger.evaluation.data import progress
    from tagger.settings import get_settings

    settings = get_settings()
    names = args.alterations.split(",") if args.alterations else list(ALTERATIONS)
    unknown = [n for n in names if n not in ALTERATIONS]
    if unknown:
        raise DataError(f"unknown alteration(s) {', '.join(unknown)}; choose from {', '.join(ALTERATIONS)}")
    data = _load(args)
    if len(data) < 2:
        raise DataError("duplicates needs at least two products")
    rng = np.random.default_rng(args.seed)
    originals = np.sort(rng.choice(len(data), size=min(args.originals, len(data)), replace=False))
    group_columns = [c.strip() for c in args.group_columns.split(",") if c.strip()] if args.group_columns else []
    negatives = pick_negatives(data.frame, originals, group_columns, args.negatives_per_image, rng, data.images)
    needed = np.unique(np.concatenate([originals, [j for _, j, _ in negatives]]).astype(np.int64))
    encoder = _encoder(args)
    subset = data.subset(needed)
    vectors_sub, ok_sub = _embed(encoder, subset, args.batch_size)
    position = {int(r): i for i, r in enumerate(needed)}

    def vector(row: int) -> np.ndarray | None:
        i = position[row]
        return vectors_sub[i] if ok_sub[i] else None

    # Altered copies, generated and embedded a chunk of originals at a time to bound memory.
    pos_sim: list[float] = []
    pos_kind: list[str] = []
    chunk = max(1, args.batch_size // max(1, len(names)))
    with progress(len(originals) * len(names), "embedding altered copies") as bar:
        for start in range(0, len(originals), chunk):
            batch_rows = [int(r) for r in originals[start : start + chunk] if vector(int(r)) is not None]
            images, owners, kinds = [], [], []
            for row in batch_rows:
                original = data.open_image(row)
                alter_rng = np.random.default_rng([args.seed, row])
                for name in names:
                    images.append(ALTERATIONS[name](original, alter_rng))
                    owners.append(row)
                    kinds.append(name)
            if images:
                altered = encoder.encode_images(images, batch_size=args.batch_size)
                for v, row, kind in zip(altered, owners, kinds):
                    pos_sim.append(float(v @ vector(row)))
                    pos_kind.append(kind)
            bar.update(len(originals[start : start + chunk]) * len(names))
    neg_sim: list[float] = []
    neg_kind: list[str] = []
    for row, other, kind in negatives:
        a, b = vector(row), vector(other)
        if a is None or b is None:
            continue
        neg_sim.append(float(a @ b))
        neg_kind.append(kind)
    if not pos_sim or not neg_sim:
        raise DataError("not enough decodable images to build positive and negative pairs")
    similarity = np.concatenate([pos_sim, neg_sim])
    is_dup = np.concatenate([np.ones(len(pos_sim), bool), np.zeros(len(neg_sim), bool)])
    thresholds = metrics.grid(0.0, 1.0, 0.001)
    sweep = metrics.threshold_sweep(similarity, is_dup, thresholds)
    # The choice is made on every observed similarity too (a grid misses values packed close to 1),
    # then floored to 4 decimals for a readable setting, and its figures recomputed at that value.
    candidates = np.union1d(thresholds, np.unique(similarity))
    exact = metrics.threshold_sweep(similarity, is_dup, candidates)
    choice = _floored(metrics.suggest_threshold(exact, args.min_precision), similarity, is_dup)
    best = _floored(metrics.best_f1(exact), similarity, is_dup)
    configured = settings.duplicate_threshold
    at_conf = metrics.threshold_sweep(similarity, is_dup, np.array([configured]))
    pos = np.asarray(pos_sim)
    neg = np.asarray(neg_sim)
    kinds_arr = np.asarray(pos_kind)
    by_alteration = {}
    for name in names:
        sims = pos[kinds_arr == name]
        by_alteration[name] = {"pairs": int(sims.size),
                               "recall": float((sims >= choice.threshold).mean()) if sims.size else None,
                               "median_similarity": float(np.median(sims)) if sims.size else None}
    lo = max(0.0, np.floor((choice.threshold - 0.1) * 100) / 100)
    rows_t = sorted(set(metrics.grid(lo, 1.0, 0.01).tolist()) | {round(choice.threshold, 6), round(best.threshold, 6),
                                                                   round(configured, 6)})
    table = metrics.threshold_sweep(similarity, is_dup, np.asarray(rows_t))
    out = _out_dir(args)
    report.plot_threshold_sweep(out / "duplicates-threshold.png", sweep, choice, configured, pos, neg)
    duplicates = {
        "originals": int(len(originals)), "alterations": names, "positives": int(len(pos)),
        "negatives": int(len(neg)), "negative_kinds": dict(Counter(neg_kind)),
        "group_columns": group_columns, "min_precision": args.min_precision,
        "suggested": {"threshold": choice.threshold, "rule": choice.rule, "precision": choice.precision,
                      "recall": choice.recall, "f1": choice.f1},
        "best_f1": {"threshold": best.threshold, "precision": best.precision, "recall": best.recall, "f1": best.f1},
        "configured_threshold": configured,
        "at_configured": {"precision": at_conf.precision[0], "recall": at_conf.recall[0], "f1": at_conf.f1[0]},
        "by_alteration": by_alteration,
        "positive_similarity": metrics.summarise(pos), "negative_similarity": metrics.summarise(neg),
        "suspect_negatives": int((neg >= 0.99).sum()),
        "sweep_table": [{"threshold": t, "precision": p, "recall": r, "f1": f, "tp": a, "fp": b, "fn": c}
                        for t, p, r, f, a, b, c in zip(table.thresholds, table.precision, table.recall, table.f1,
                                                       table.tp, table.fp, table.fn)],
        "sweep": {"thresholds": sweep.thresholds, "precision": sweep.precision, "recall": sweep.recall,
                  "f1": sweep.f1},
        "plots": {"sweep": "duplicates-threshold.png"},
    }
    result = {"run": _run_info(args, argv, encoder, data), "duplicates": duplicates}
    print(f"duplicates: {len(pos)} positive / {len(neg)} negative pairs; suggested threshold {choice.threshold:.4g} "
          f"({choice.rule}): precision {choice.precision:.3f} recall {choice.recall:.3f} F1 {choice.f1:.3f}")
    _finish(out, "duplicates", result, report.duplicates_markdown(report.jsonable(result)))
    return 0


# ---- entry point -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tagger eval", description="Measure the tagger on labelled products.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("zero-shot", help="zero-shot tag quality for taxonomy attributes vs label columns")
    _common(p)
    p.add_argument("--attribute", action="append", required=True,
                   help="taxonomy attribute to evaluate (repeat, each with its own --label-column)")
    p.add_argument("--label-column", action="append", required=True, help="column holding the true value")
    p.add_argument("--mapping", action="append",
                   help="YAML/JSON file: dataset value -> label key (null: leave out); with several attributes the "
                        "file names its 'attribute' (examples: tagger/evaluation/mappings/)")
    p.add_argument("--target-precision", type=float, default=0.9,
                   help="report the smallest threshold reaching this precision (default: 0.9)")
    p.add_argument("--text-column",
                   help="product text mixed into the score, as the service does with TAGGER_TEXT_WEIGHT")
    p.add_argument("--text-weight", type=float, help="override TAGGER_TEXT_WEIGHT for this run")
    g = p.add_argument_group("exemplars (few-shot; see tagger/evaluation/shots.py)")
    g.add_argument("--shots", nargs="?", const="0,1,5,10,25",
                   help="K exemplars per label drawn from --train-split, e.g. 0,1,5,10,25 (the default when given "
                        "without a value); the test split is --split")
    g.add_argument("--train-split", default="train", help="split the exemplars are drawn from (default: train)")
    g.add_argument("--holdout", type=float,
                   help="draw exemplars from this share of --split instead (stratified, seeded) and score the rest: "
                        "for a model trained on the train split, whose train images it has memorised")
    g.add_argument("--seeds", type=int, default=5, help="exemplar draws per K (default: 5)")
    g.add_argument("--pool-per-label", type=int, default=50,
                   help="train images per label encoded as the exemplar pool (default: 50)")
    g.add_argument("--shift", help="comma-separated conditions applied to exemplars and test images alike: "
                                   "clean, grey, lowres, crop, background (default: clean)")
    g.add_argument("--exemplar-scale", type=float, help="override TAGGER_EXEMPLAR_SCALE")
    g.add_argument("--exemplar-prior", type=float, help="override TAGGER_EXEMPLAR_PRIOR")
    g.add_argument("--exemplar-temperature", type=float, help="override TAGGER_EXEMPLAR_TEMPERATURE")
    g.add_argument("--exemplar-fit", choices=["yes", "no"], help="override TAGGER_EXEMPLAR_FIT")
    g.add_argument("--exemplar-only", help="comma-separated label keys to score from exemplars alone (prompts "
                                           "dropped), as house labels the model has no words for; 'all': "
                                           "every label (a nearest-centroid classifier on the features)")
    p.set_defaults(func=cmd_zero_shot)

    p = sub.add_parser("retrieval", help="text-to-image HITS@1/5/10 and MRR")
    _common(p)
    p.add_argument("--text-column", default="productDisplayName",
                   help="query text column (default: productDisplayName)")
    p.add_argument("--group-column", help="also break the figures down by this column (e.g. articleType)")
    p.set_defaults(func=cmd_retrieval)

    p = sub.add_parser("duplicates", help="near-duplicate precision/recall vs threshold, and a suggested threshold")
    _common(p)
    p.add_argument("--originals", type=int, default=200, help="images to alter (default: 200)")
    p.add_argument("--alterations", help=f"comma-separated subset of: {','.join(_alteration_names())}")
    p.add_argument("--negatives-per-image", type=int, default=7,
                   help="hard negative partners per original (default: 7)")
    p.add_argument("--group-columns", default="articleType,baseColour",
                   help="hard negatives share these columns when possible (default: articleType,baseColour)")
    p.add_argument("--min-precision", type=float, default=0.98,
                   help="suggest the lowest threshold reaching this pair precision (default: 0.98)")
    p.set_defaults(func=cmd_duplicates)
    return parser


def _alteration_names() -> list[str]:
    from tagger.evaluation.alterations import ALTERATIONS

    return list(ALTERATIONS)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args, argv) or 0)
    except (DataError, TaggerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
