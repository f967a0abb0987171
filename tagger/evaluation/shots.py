"""`tagger eval zero-shot --shots K[,K...]`: how much K approved examples per label help, per shop condition.

Exemplars are drawn from a train split (K per label, several seeds), the test split is scored with the service's
own function (``scoring.attribute_probabilities``: zero-shot prompts plus exemplar centroids, ``tagger.fewshot``),
and weighted F1 / accuracy / ECE are reported per K as mean ± std over seeds. ``--shift`` repeats the whole
measurement on shifted copies of both the exemplars and the test images (greyscale, 40 px, crops, random
backgrounds): the shop's own look, which the exemplars should teach.

Image embeddings and backbone features come from one ``encode_images_with_features`` pass per image and
condition and are cached under ``.cache/eval-shots/`` (keyed by model, data, rows and shift), so re-runs with
other K, seeds or parameters cost no encoding.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tagger import fewshot, scoring
from tagger.evaluation import report
from tagger.evaluation.data import DataError, EvalData, load_eval_data, progress
from tagger.settings import REPO_ROOT

CONDITIONS = ("clean", "grey", "lowres", "crop", "background")
CACHE_DIR = REPO_ROOT / ".cache" / "eval-shots"


def parse_shots(raw: str) -> list[int]:
    try:
        shots = sorted({int(x) for x in raw.split(",") if x.strip()})
    except ValueError:
        raise DataError(f"--shots {raw!r}: give whole numbers separated by commas, e.g. 0,1,5,10,25") from None
    if not shots or shots[0] < 0:
        raise DataError(f"--shots {raw!r}: give whole numbers of at least 0, e.g. 0,1,5,10,25")
    return shots


def parse_conditions(raw: str | None) -> list[str]:
    names = [x.strip() for x in (raw or "clean").split(",") if x.strip()]
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown:
        raise DataError(f"unknown --shift {', '.join(unknown)}; choose from {', '.join(CONDITIONS)}")
    return names


def draw_pool(keys: Sequence[str | None], per_label: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``per_label`` rows of each label (seeded), the candidates exemplars are drawn from."""
    rows: list[int] = []
    by_label: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            by_label.setdefault(key, []).append(i)
    for key in sorted(by_label):
        members = np.asarray(by_label[key])
        rows.extend(rng.permutation(members)[:per_label].tolist())
    return np.sort(np.asarray(rows, dtype=np.int64))


def as_exemplar_only(attribute: Any, keys: Sequence[str]) -> Any:
    """The attribute with ``keys`` turned into exemplar-only labels (prompts dropped), as a shop's house labels
    that the model has no words for."""
    from dataclasses import replace

    scored = {label.key for label in attribute.scored_labels}
    if list(keys) == ["all"]:
        keys = sorted(scored)
    unknown = [k for k in keys if k not in scored]
    if unknown:
        raise DataError(f"--exemplar-only: {', '.join(unknown)} not scored label(s) of {attribute.name!r}")
    return replace(attribute, labels=tuple(replace(label, prompts=(), exemplar_only=True) if label.key in keys
                                           else label for label in attribute.labels))


def holdout_split(keys: Sequence[str | None], share: float, rng: np.random.Generator) -> np.ndarray:
    """A mask of rows set aside as the exemplar pool: ``share`` of each label's rows (at least one, and at least one
    left to score when the label has two or more)."""
    mask = np.zeros(len(keys), dtype=bool)
    by_label: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            by_label.setdefault(key, []).append(i)
    for key in sorted(by_label):
        members = rng.permutation(np.asarray(by_label[key]))
        take = max(1, int(round(share * len(members)))) if len(members) > 1 else 0
        mask[members[: min(take, len(members) - 1)]] = True
    return mask


def draw_shots(pool_keys: Sequence[str], usable: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """K pool rows per label (all of a label's rows when it has fewer)."""
    chosen: list[int] = []
    for key in sorted(set(pool_keys)):
        members = np.array([i for i, (p, ok) in enumerate(zip(pool_keys, usable)) if p == key and ok], dtype=np.int64)
        chosen.extend(rng.permutation(members)[:k].tolist())
    return np.asarray(sorted(chosen), dtype=np.int64)


def _cache_path(encoder: Any, data: EvalData, condition: str, seed: int) -> Path:
    digest = hashlib.sha256("\x1f".join([encoder.model_id, data.source, condition, str(seed)]).encode())
    return CACHE_DIR / f"{digest.hexdigest()[:20]}.npz"


def encode_condition(encoder: Any, data: EvalData, condition: str, *, seed: int, join_column: str,
                     batch_size: int, desc: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings, backbone features, decodable mask) of every row's image under ``condition``.

    Cached per image id (one file per model, data source, condition and seed), so any subset or split of the
    same data reuses what was encoded before."""
    from PIL import Image

    from tagger.modeling.augment import shift

    if join_column not in data.frame.columns:
        raise DataError(f"--shots needs an id column to cache image features; {data.source} has no "
                        f"{join_column!r} (set --join-column)")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = _cache_path(encoder, data, condition, seed)
    ids = [str(x) for x in data.frame[join_column].tolist()]
    cache: dict[str, tuple[np.ndarray, np.ndarray, bool]] = {}
    if path.is_file():
        stored = np.load(path)
        cache = {i: (e, f, bool(o)) for i, e, f, o in zip(stored["ids"].tolist(), stored["embeddings"],
                                                         stored["features"], stored["ok"])}
    todo = [row for row, i in enumerate(ids) if i not in cache]
    with progress(len(todo), f"{desc} ({condition})") as bar:
        for start in range(0, len(todo), batch_size):
            rows = todo[start : start + batch_size]
            images, good = [], []
            for row in rows:
                try:
                    image = data.open_image(row)
                except (OSError, ValueError, Image.DecompressionBombError):
                    cache[ids[row]] = (np.zeros(encoder.dim, np.float32), np.zeros(0, np.float32), False)
                    continue
                if condition != "clean":
                    key = int(ids[row]) if ids[row].isdigit() else int(hashlib.sha256(ids[row].encode()).hexdigest()[:8], 16)
                    image = shift(image, condition, np.random.default_rng([seed, key])).image
                images.append(image)
                good.append(row)
            if images:
                e, f = encoder.encode_images_with_features(images, batch_size=batch_size)
                for row, ev, fv in zip(good, e, f):
                    cache[ids[row]] = (ev, fv, True)
            bar.update(len(rows))
    usable = [v for v in cache.values() if v[2]]
    if not usable:
        raise DataError(f"no image of {data.source} could be decoded")
    dim = usable[0][1].shape[0]
    if todo:
        keys = list(cache)
        np.savez(path, ids=np.array(keys), ok=np.array([cache[k][2] for k in keys]),
                 embeddings=np.stack([cache[k][0] for k in keys]),
                 features=np.stack([cache[k][1] if cache[k][2] else np.full(dim, np.nan, np.float32) for k in keys]))
    ok = np.array([cache[i][2] for i in ids], dtype=bool)
    embeddings = np.stack([cache[i][0] for i in ids]).astype(np.float32)
    features = np.stack([cache[i][1] if cache[i][2] else np.full(dim, np.nan, np.float32) for i in ids])
    return embeddings, features.astype(np.float32), ok


def score_shot(attribute: Any, proto: scoring.LabelPrototypes, logit_scale: float, test: tuple[np.ndarray, np.ndarray],
               pool: tuple[np.ndarray, np.ndarray, list[str]], chosen: np.ndarray, params: fewshot.FewShotParams
               ) -> np.ndarray:
    """Test-set probabilities with the ``chosen`` pool rows as exemplars (none: zero-shot)."""
    embeddings, features = test
    pool_embeddings, pool_features, pool_keys = pool
    exemplars = None
    if len(chosen):
        # Centred on the catalog's mean feature, as the service does (tagger.db.exemplar_repository).
        catalog = np.concatenate([features, pool_features])
        centre = np.nanmean(catalog[np.isfinite(catalog).all(axis=1)], axis=0)
        exemplars = fewshot.AttributeExemplars(attribute.name, tuple(pool_keys[i] for i in chosen),
                                               pool_features[chosen], embeddings=pool_embeddings[chosen],
                                               centre=centre)
    probabilities, _, _ = scoring.attribute_probabilities(attribute, proto, embeddings, logit_scale,
                                                          image_features=features, exemplars=exemplars, params=params)
    return probabilities


def figures(attribute: Any, keys: tuple[str, ...], probabilities: np.ndarray, true_keys: Sequence[str],
            threshold: float) -> dict[str, float]:
    from tagger.evaluation.cli import evaluate_attribute

    f = evaluate_attribute(attribute, keys, probabilities, true_keys, threshold, 0.9)
    return {"weighted_f1": f["weighted_f1"], "accuracy": f["accuracy"], "macro_f1": f["macro_f1"], "ece": f["ece"],
            "coverage_at_threshold": f["threshold"]["coverage_at_configured"],
            "precision_at_threshold": f["threshold"]["precision_at_configured"]}


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from tagger.evaluation.cli import _encoder, _mapping_for, _out_dir, _run_info, map_labels
    from tagger.evaluation.data import load_mapping
    from tagger.settings import get_settings
    from tagger.taxonomy import load_taxonomies

    settings = get_settings()
    shots = parse_shots(args.shots)
    conditions = parse_conditions(args.shift)
    if len(args.attribute) != 1 or len(args.label_column) != 1:
        raise DataError("--shots evaluates one attribute at a time: give one --attribute and one --label-column")
    if args.seeds < 1 or args.pool_per_label < 1:
        raise DataError("--seeds and --pool-per-label must be at least 1")
    if args.holdout is None and args.train_split == args.split:
        raise DataError(f"--train-split {args.train_split!r} equals --split: exemplars must come from other products "
                        "than the ones scored (or use --holdout)")
    if args.holdout is not None and not 0.0 < args.holdout < 1.0:
        raise DataError("--holdout must be a fraction between 0 and 1, e.g. 0.5")
    name, column = args.attribute[0], args.label_column[0]
    taxonomies = load_taxonomies(Path(args.taxonomy_dir) if args.taxonomy_dir else settings.taxonomy_dir)
    try:
        attribute = taxonomies.attribute(name)
    except KeyError:
        raise DataError(f"attribute {name!r} is not in the taxonomies; known: "
                        f"{', '.join(a.name for a in taxonomies.attributes)}") from None
    mappings = [load_mapping(p) for p in args.mapping or []]
    mapping = _mapping_for(name, column, mappings, 1)
    house = [k.strip() for k in (args.exemplar_only or "").split(",") if k.strip()]
    if house:
        attribute = as_exemplar_only(attribute, house)
    params = fewshot.FewShotParams(
        scale=settings.exemplar_scale if args.exemplar_scale is None else args.exemplar_scale,
        prior=settings.exemplar_prior if args.exemplar_prior is None else args.exemplar_prior,
        temperature=settings.exemplar_temperature if args.exemplar_temperature is None else args.exemplar_temperature,
        fit=settings.exemplar_fit if args.exemplar_fit is None else args.exemplar_fit == "yes")

    common = dict(image_column=args.image_column, image_root=args.image_root, split_column=args.split_column,
                  join_column=args.join_column)
    test = load_eval_data(args.data, split=args.split, limit=args.limit, seed=args.seed, **common)
    test_keys, info = map_labels(test.column(column).tolist(), attribute, mapping)
    if args.holdout is not None:
        # Exemplars and scored products both from --split (neither seen in training): a seeded, stratified share
        # of each label's products is the exemplar pool, the rest is scored.
        pool_part = holdout_split(test_keys, args.holdout, np.random.default_rng([args.seed, 2]))
        train, train_keys = test, [k if pool_part[i] else None for i, k in enumerate(test_keys)]
        test_keys = [None if pool_part[i] else k for i, k in enumerate(test_keys)]
    else:
        train = load_eval_data(args.data, split=args.train_split, **common)
        train_keys, _ = map_labels(train.column(column).tolist(), attribute, mapping)
    test = test.subset([i for i, k in enumerate(test_keys) if k is not None])
    test_keys = [k for k in test_keys if k is not None]
    if not test_keys:
        raise DataError(f"no product of split {args.split!r} has a label that maps to {name!r}; give a --mapping file")
    pool_rows = draw_pool(train_keys, args.pool_per_label, np.random.default_rng([args.seed, 1]))
    if not len(pool_rows):
        raise DataError(f"no product of split {args.train_split!r} has a label that maps to {name!r}")
    pool = train.subset(pool_rows)
    pool_keys = [str(train_keys[i]) for i in pool_rows]

    encoder = _encoder(args)
    prototypes = scoring.build_prototypes(taxonomies, encoder.encode_texts)
    proto = prototypes[name]
    logit_scale = float(encoder.logit_scale)
    threshold = attribute.threshold if attribute.threshold is not None else settings.review_threshold
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for condition in conditions:
        t_emb, t_feat, t_ok = encode_condition(encoder, test, condition, seed=args.seed, join_column=args.join_column,
                                               batch_size=args.batch_size, desc="test images")
        p_emb, p_feat, p_ok = encode_condition(encoder, pool, condition, seed=args.seed, join_column=args.join_column,
                                               batch_size=args.batch_size, desc="exemplar pool")
        true = [k for k, ok in zip(test_keys, t_ok) if ok]
        per_k: dict[str, Any] = {}
        for k in shots:
            runs = []
            for s in range(1 if k == 0 else args.seeds):
                chosen = (draw_shots(pool_keys, p_ok, k, np.random.default_rng([args.seed, s, k])) if k
                          else np.zeros(0, dtype=np.int64))
                probabilities = score_shot(attribute, proto, logit_scale, (t_emb[t_ok], t_feat[t_ok]),
                                           (p_emb, p_feat, pool_keys), chosen, params)
                runs.append({"seed": s, "exemplars": int(len(chosen)),
                             **figures(attribute, proto.keys, probabilities, true, threshold)})
            per_k[str(k)] = {"runs": runs, **{f"{m}_{stat}": float(fn([r[m] for r in runs]))
                                              for m in ("weighted_f1", "accuracy", "ece", "coverage_at_threshold",
                                                        "precision_at_threshold")
                                              for stat, fn in (("mean", np.mean), ("std", np.std))}}
            print(f"{condition:<11} K={k:<3} weighted F1 {per_k[str(k)]['weighted_f1_mean']:.3f} ± "
                  f"{per_k[str(k)]['weighted_f1_std']:.3f}  ECE {per_k[str(k)]['ece_mean']:.3f}", file=sys.stderr)
        results[condition] = {"test_products": int(t_ok.sum()), "pool_products": int(p_ok.sum()), "shots": per_k}

    out = _out_dir(args)
    result = {"run": {**_run_info(args, argv, encoder, test),
                      "train_split": f"{args.split} (held-out share {args.holdout:g})" if args.holdout is not None
                      else args.train_split,
                      "pool_per_label": args.pool_per_label, "seeds": args.seeds,
                      "seconds": round(time.perf_counter() - started, 1)},
              "attribute": name, "label_column": column, "mapping": mapping.source if mapping else None,
              "unmapped_count": info["unmapped_count"], "threshold": threshold, "exemplar_only_labels": house,
              "params": {"scale": params.scale, "prior": params.prior, "temperature": params.temperature,
                         "fit": params.fit},
              "shots": shots, "conditions": results, "plots": {"shots": f"shots-{name}.png"}}
    plot_shots(out / f"shots-{name}.png", results, shots, f"{name}: weighted F1 vs exemplars per label")
    report.write_json(out / "zero-shot-shots.json", result)
    markdown = shots_markdown(report.jsonable(result))
    (out / "report.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    print(f"wrote {out / 'report.md'} and {out / 'zero-shot-shots.json'}", file=sys.stderr)
    return 0


def shots_table(result: dict[str, Any], metric: str = "weighted_f1") -> str:
    conditions = list(result["conditions"])
    rows = []
    for k in result["shots"]:
        row: list[Any] = [str(k)]
        for c in conditions:
            s = result["conditions"][c]["shots"][str(k)]
            mean, std = s[metric + "_mean"], s[metric + "_std"]
            if mean is None:  # e.g. precision when nothing is accepted
                row.append("–")
            else:
                row.append(f"{mean:.3f} ± {std:.3f}" if k else f"{mean:.3f}")
        rows.append(row)
    return report.table(["K per label", *conditions], rows)


def shots_markdown(result: dict[str, Any]) -> str:
    run = result["run"]
    p = result["params"]
    lines = [f"# Exemplars: {result['attribute']} (column `{result['label_column']}`)", "",
             f"- model `{run['model_id']}`; data `{run['data']}`: test split `{run['split']}`, exemplars drawn from "
             f"split `{run['train_split']}` (pool of up to {run['pool_per_label']} per label), {run['seeds']} seeds",
             f"- few-shot parameters: scale {p['scale']:g}, prior {p['prior']:g}, temperature {p['temperature']:g}, "
             f"fitted to the exemplars (leave-one-out): {'yes' if p['fit'] else 'no'}",
             f"- command: `{run['command_line']}`"]
    if result.get("exemplar_only_labels"):
        lines.append(f"- labels scored from exemplars alone (prompts dropped): "
                     f"{', '.join(result['exemplar_only_labels'])}")
    lines += ["",
              "## Weighted F1 (mean ± std over seeds)", "", shots_table(result), "",
              "## Expected calibration error (10 bins)", "", shots_table(result, "ece"), "",
              f"## Share of products accepted at threshold {result['threshold']:g}", "",
              shots_table(result, "coverage_at_threshold"), "",
              "## Precision of accepted tags", "", shots_table(result, "precision_at_threshold"), "",
              f"![weighted F1 vs K]({result['plots']['shots']})", ""]
    return "\n".join(lines)


def plot_shots(path: Path, results: dict[str, Any], shots: Sequence[int], title: str) -> None:
    plt = report._pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.4), dpi=100)
    xs = list(range(len(shots)))
    for condition, r in results.items():
        mean = [r["shots"][str(k)]["weighted_f1_mean"] for k in shots]
        std = [r["shots"][str(k)]["weighted_f1_std"] for k in shots]
        ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=condition)
    ax.set_xticks(xs, [str(k) for k in shots])
    ax.set_xlabel("exemplars per label (K)")
    ax.set_ylabel("weighted F1")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

