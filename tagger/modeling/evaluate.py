"""Quick zero-shot tagging and retrieval metrics on the val split (figures for the model card).

Zero-shot: each label is a set of prompts whose embeddings are averaged (prompt ensembling), an
image takes the label with the highest cosine. Retrieval: product title as query, every val image
as a candidate; a hit is the query's own image (strict: products with identical titles count as
misses).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from tagger.modeling.captions import (
    COLOUR_LABELS, COLOUR_WORDS, GENDER_FOR, GENDER_LABELS, GENDER_WORDS, USAGE_LABELS, USAGE_WORDS, Item,
    type_names,
)

TextFn = Callable[[list[str]], np.ndarray]  # texts -> (n, dim) unit vectors


def label_prompts(field: str, labels: list[str]) -> list[list[str]]:
    """Prompt ensemble per label (what a taxonomy author would plausibly write)."""
    out: list[list[str]] = []
    for label in labels:
        if field == "type":
            name = type_names(label)[0]
            out.append([f"a photo of a {name}", name, f"a product photo of a {name}"])
        elif field == "colour":
            c = COLOUR_WORDS[label][0]
            out.append([f"a photo of a {c} product", f"{c} colour", f"something {c}", f"a {c} item"])
        elif field == "gender":
            g, gf = GENDER_WORDS[label][0], GENDER_FOR[label][0]
            out.append([f"a {g} product", f"fashion {gf}", f"a photo of {g} clothing or accessories"])
        elif field == "usage":
            u = USAGE_WORDS[label][0]
            out.append([f"{u} wear", f"a product for {u} use", f"a photo of {u} fashion"])
        else:
            raise ValueError(field)
    return out


def _weighted_f1(y: np.ndarray, p: np.ndarray, n_labels: int) -> float:
    f1s, weights = [], []
    for k in range(n_labels):
        support = int((y == k).sum())
        if support == 0:
            continue
        tp = int(((p == k) & (y == k)).sum())
        prec = tp / max(1, int((p == k).sum()))
        rec = tp / support
        f1s.append(0.0 if tp == 0 else 2 * prec * rec / (prec + rec))
        weights.append(support)
    return float(np.average(f1s, weights=weights)) if weights else 0.0


def field_values(items: list[Item], field: str) -> list[str | None]:
    attr = {"type": "article_type", "colour": "colour", "gender": "gender", "usage": "usage"}[field]
    return [getattr(it, attr) for it in items]


def zero_shot(image_emb: np.ndarray, items: list[Item], text_fn: TextFn, field: str,
              labels: list[str] | None = None) -> dict[str, float]:
    """Weighted F1 and accuracy of prompt-ensemble zero-shot classification for one field."""
    values = field_values(items, field)
    if labels is None:
        labels = {"colour": COLOUR_LABELS, "gender": GENDER_LABELS, "usage": USAGE_LABELS}.get(field) or sorted(
            {v for v in values if v is not None})
    index = {label: k for k, label in enumerate(labels)}
    keep = np.array([v in index for v in values])
    y = np.array([index[v] for v in values if v in index])
    prompts = label_prompts(field, labels)
    flat = [p for ps in prompts for p in ps]
    emb = text_fn(flat)
    protos, pos = [], 0
    for ps in prompts:
        m = emb[pos : pos + len(ps)].mean(axis=0)
        protos.append(m / np.linalg.norm(m))
        pos += len(ps)
    pred = (image_emb[keep] @ np.stack(protos).T).argmax(axis=1)
    return {"f1": _weighted_f1(y, pred, len(labels)), "acc": float((pred == y).mean()), "n": int(keep.sum()),
            "labels": len(labels)}


def retrieval(image_emb: np.ndarray, items: list[Item], text_fn: TextFn) -> dict[str, float]:
    """Title -> image retrieval over all val images: HITS@1/5/10 and MRR."""
    rows = [i for i, it in enumerate(items) if it.title]
    q = text_fn([items[i].title or "" for i in rows])
    sims = q @ image_emb.T
    target = sims[np.arange(len(rows)), rows][:, None]
    rank = (sims > target).sum(axis=1) + 1  # 1-based rank of the true image
    return {"hits@1": float((rank <= 1).mean()), "hits@5": float((rank <= 5).mean()),
            "hits@10": float((rank <= 10).mean()), "mrr": float((1.0 / rank).mean()), "n": len(rows)}


def full_report(image_emb: np.ndarray, items: list[Item], text_fn: TextFn, with_retrieval: bool = True) -> dict:
    out: dict = {f: zero_shot(image_emb, items, text_fn, f) for f in ("type", "colour", "gender", "usage")}
    if with_retrieval:
        out["retrieval"] = retrieval(image_emb, items, text_fn)
    return out


def linear_probe(train_x: np.ndarray, train_y: list[str], tests: dict[str, np.ndarray], test_y: list[str],
                 seed: int = 0, steps: int = 300) -> dict[str, float]:
    """Weighted F1 of a supervised linear classifier on frozen features (a reference, not zero-shot).

    Tells how much of the backbone's information (and robustness) the zero-shot heads keep: if the
    probe holds up on shifted images and zero-shot does not, the heads are what overfit.
    """
    import torch

    labels = sorted(set(train_y))
    index = {label: k for k, label in enumerate(labels)}
    mean, std = train_x.mean(0), train_x.std(0) + 1e-3
    x = torch.from_numpy((train_x - mean) / std).float()
    y = torch.tensor([index[v] for v in train_y])
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Linear(x.shape[1], len(labels))
    with torch.no_grad():
        w.weight.normal_(0, 0.01, generator=g)
        w.bias.zero_()
    opt = torch.optim.Adam(w.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(w(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    keep = np.array([v in index for v in test_y])
    yt = np.array([index[v] for v in test_y if v in index])
    out = {}
    with torch.no_grad():
        for name, tx in tests.items():
            pred = w(torch.from_numpy((tx[keep] - mean) / std).float()).argmax(1).numpy()
            out[name] = _weighted_f1(yt, pred, len(labels))
    return out
