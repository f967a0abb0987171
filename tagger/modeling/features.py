"""Frozen features of clean and augmented views, computed once and cached under ``.cache/``.

Heads train on cached features only, so a training run is seconds once features exist. The cache
key covers everything that changes the features (backbone, input size, augmentation version,
seed, view count, the exact ids), so a stale cache is never reused.
"""

from __future__ import annotations

import hashlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from tagger.encoders.preprocess import colour_histograms, to_lite_array
from tagger.modeling.augment import View, augmented_view, shift
from tagger.modeling.backbone import ImageBackbone, TextBackbone
from tagger.modeling.data import Record

AUG_VERSION = 2  # bump when augment.py changes what views look like


@dataclass
class ViewFeatures:
    backbone: np.ndarray  # (n, 1280) float32 pooled CNN features
    hist: np.ndarray  # (n, HIST_DIM) colour histograms
    item: np.ndarray  # (n,) index into the records list
    grey: np.ndarray  # (n,) bool: view has no colour information

    def image_input(self) -> np.ndarray:
        return np.concatenate([self.backbone, self.hist], axis=1)


def _key(*parts: object) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:16]


def _make_views(records: list[Record], kind: str, view: int, seed: int) -> list[tuple[int, Callable[[], View]]]:
    """Lazy view makers; each view has its own RNG stream (seed, id, view) -> order-independent.

    ``kind``: "train" (view 0 = the clean image, view k >= 1 = augmented), "clean", or a shift name.
    """
    jobs: list[tuple[int, Callable[[], View]]] = []
    for idx, rec in enumerate(records):
        if kind == "clean" or (kind == "train" and view == 0):
            jobs.append((idx, lambda r=rec: View(r.image(), False)))
        elif kind == "train":
            jobs.append((idx, lambda r=rec: augmented_view(r.image(), np.random.default_rng([seed, r.item.id, view - 1]))))
        else:  # a named shift for evaluation
            jobs.append((idx, lambda r=rec: shift(r.image(), kind, np.random.default_rng([seed, r.item.id, 99]))))
    return jobs


def _prepare(batch: list[tuple[int, Callable[[], View]]], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    views = [make() for _, make in batch]
    images: list[Image.Image] = [v.image for v in views]
    return (
        to_lite_array(images, size),
        colour_histograms(images),
        np.array([i for i, _ in batch], dtype=np.int64),
        np.array([v.grey for v in views], dtype=bool),
    )


def extract(records: list[Record], backbone: ImageBackbone, cache_dir: Path, kind: str = "train", n_aug: int = 3,
            seed: int = 0, batch_size: int = 64, log: bool = True) -> ViewFeatures:
    """Features for every view of ``records`` (``kind``: train = clean + n_aug augmented; clean; a shift).

    Each view index is cached on its own, so raising ``n_aug`` only computes the new views.
    """
    parts = [_extract_one(records, backbone, cache_dir, kind, v, seed, batch_size, log)
             for v in range(1 + n_aug if kind == "train" else 1)]
    return ViewFeatures(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("backbone", "hist", "item", "grey")))


def _extract_one(records: list[Record], backbone: ImageBackbone, cache_dir: Path, kind: str, view: int, seed: int,
                 batch_size: int, log: bool) -> ViewFeatures:
    ids = [r.item.id for r in records]
    key = _key(backbone.name, backbone.size, AUG_VERSION if view > 0 or kind not in ("train", "clean") else 0,
               "clean" if kind == "clean" or view == 0 else kind, view if kind == "train" else 0, seed, ids)
    path = cache_dir / f"views-{kind}{view}-{key}.npz"
    if path.exists():
        z = np.load(path)
        return ViewFeatures(z["backbone"].astype(np.float32), z["hist"].astype(np.float32), z["item"], z["grey"])
    jobs = _make_views(records, kind, view, seed)
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    feats, hists, items, greys = [], [], [], []
    start = time.time()
    # Decode/augment the next batch in a thread while onnxruntime (GIL released) runs this one.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_prepare, batches[0], backbone.size) if batches else None
        for b in range(len(batches)):
            assert pending is not None
            arr, hist, item, grey = pending.result()
            pending = pool.submit(_prepare, batches[b + 1], backbone.size) if b + 1 < len(batches) else None
            feats.append(backbone.forward_array(arr))
            hists.append(hist)
            items.append(item)
            greys.append(grey)
            if log and (b % 40 == 0 or b == len(batches) - 1):
                done = sum(len(x) for x in items)
                print(f"  [{kind}{view}] {done}/{len(jobs)} views, {done / (time.time() - start):.0f}/s", file=sys.stderr)
    # Round through float16 like the cache does, so a fresh run and a cached run train identically.
    out = ViewFeatures(
        np.concatenate(feats).astype(np.float16).astype(np.float32),
        np.concatenate(hists).astype(np.float16).astype(np.float32),
        np.concatenate(items),
        np.concatenate(greys),
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, backbone=out.backbone.astype(np.float16), hist=out.hist.astype(np.float16), item=out.item, grey=out.grey)
    tmp.replace(path)
    return out


def embed_texts(texts: list[str], text_backbone: TextBackbone | None, cache_dir: Path) -> np.ndarray:
    """MiniLM embeddings of unique texts, cached by the exact list."""
    path = cache_dir / f"texts-{_key('minilm', texts)}.npy"
    if path.exists():
        return np.load(path).astype(np.float32)
    if text_backbone is None:
        text_backbone = TextBackbone()
    start = time.time()
    out = text_backbone(texts).astype(np.float16)
    print(f"  [texts] {len(texts)} in {time.time() - start:.0f}s", file=sys.stderr)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return out.astype(np.float32)
