"""Why this tag: occlusion sensitivity over a product image (pure NumPy + Pillow, no I/O).

The localisation method of the FashionCLIP paper: cover one patch of the image at a time, score every covered
copy for the label, and call a patch important when covering it makes the label's score drop. Patches are
windows of ``window`` x ``window`` cells on a ``grid`` x ``grid`` lattice, slid one cell at a time, so the map
has one value per cell (the mean drop of the windows covering it) and is smoother than one window per cell.

The caller supplies the scorer (images -> one score per image) and is expected to score all variants in one
batch: ``occlusion_map`` calls it exactly once.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

Scorer = Callable[[Sequence[Image.Image]], np.ndarray]
Fill = str | tuple[int, int, int]  # "mean" (the image's mean colour), "grey", or an RGB triple

MAX_GRID = 32


class OcclusionError(ValueError):
    """The occlusion parameters or the scorer's answer are unusable."""


@dataclass(frozen=True)
class OcclusionMap:
    heat: np.ndarray  # (grid, grid) float64: mean drop of the label's score when the cell is covered
    base_score: float  # the label's score on the uncovered image
    grid: int
    window: int

    @property
    def max_drop(self) -> float:
        return float(self.heat.max()) if self.heat.size else 0.0


def cell_edges(size: int, grid: int) -> np.ndarray:
    """Pixel boundaries of ``grid`` cells along one side of ``size`` pixels (``grid + 1`` increasing ints)."""
    return np.round(np.linspace(0, size, grid + 1)).astype(int)


def fill_colour(image: Image.Image, fill: Fill) -> tuple[int, int, int]:
    if isinstance(fill, tuple):
        if len(fill) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in fill):
            raise OcclusionError(f"fill {fill!r}: give three integers from 0 to 255")
        return fill
    if fill == "grey":
        return (128, 128, 128)
    if fill == "mean":
        mean = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0)
        return (int(round(mean[0])), int(round(mean[1])), int(round(mean[2])))
    raise OcclusionError(f"fill {fill!r}: use 'mean', 'grey' or an (r, g, b) triple")


def windows(grid: int, window: int) -> list[tuple[int, int]]:
    """Top-left cells (row, column) of every window position, row by row."""
    span = grid - window + 1
    return [(row, col) for row in range(span) for col in range(span)]


def occluded_variants(image: Image.Image, grid: int = 8, window: int = 2, fill: Fill = "mean"
                      ) -> tuple[list[Image.Image], list[tuple[int, int]]]:
    """Copies of ``image`` with one window covered each, and the window positions, in the same order."""
    _check(grid, window)
    rgb = image.convert("RGB")
    pixels = np.asarray(rgb, dtype=np.uint8)
    colour = np.asarray(fill_colour(rgb, fill), dtype=np.uint8)
    ys, xs = cell_edges(rgb.height, grid), cell_edges(rgb.width, grid)
    variants: list[Image.Image] = []
    positions = windows(grid, window)
    for row, col in positions:
        covered = pixels.copy()
        covered[ys[row]:ys[row + window], xs[col]:xs[col + window]] = colour
        variants.append(Image.fromarray(covered, mode="RGB"))
    return variants, positions


def occlusion_map(image: Image.Image, score: Scorer, *, grid: int = 8, window: int = 2,
                  fill: Fill = "mean") -> OcclusionMap:
    """The occlusion-sensitivity map of ``image`` for the label that ``score`` measures.

    ``score`` is called once with the original followed by every covered copy and must return one number per
    image. A cell's value is the mean of ``score(original) - score(covered)`` over the windows covering it:
    positive where covering the cell lowers the label's score.
    """
    variants, positions = occluded_variants(image, grid, window, fill)
    scores = np.asarray(score([image.convert("RGB"), *variants]), dtype=np.float64).reshape(-1)
    if scores.shape[0] != len(variants) + 1:
        raise OcclusionError(f"the scorer returned {scores.shape[0]} scores for {len(variants) + 1} images")
    if not np.all(np.isfinite(scores)):
        raise OcclusionError("the scorer returned a score that is not a finite number")
    base = float(scores[0])
    drops = base - scores[1:]
    total = np.zeros((grid, grid), dtype=np.float64)
    covered = np.zeros((grid, grid), dtype=np.float64)
    for drop, (row, col) in zip(drops, positions, strict=True):
        total[row:row + window, col:col + window] += drop
        covered[row:row + window, col:col + window] += 1.0
    return OcclusionMap(heat=total / covered, base_score=base, grid=grid, window=window)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """A black-red-yellow-white ramp for values in [0, 1]; (..., 3) uint8."""
    t = np.clip(values, 0.0, 1.0)[..., None]
    ramp = np.concatenate([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)
    return (ramp * 255).astype(np.uint8)


def overlay(image: Image.Image, heat: np.ndarray, *, max_side: int = 448, strength: float = 0.65) -> Image.Image:
    """``image`` (scaled to at most ``max_side``) with the positive part of ``heat`` painted over it.

    Cells whose cover did not lower the score stay untouched, so the product remains visible where it does not
    explain the label; the most important cell is painted at ``strength`` opacity.
    """
    rgb = image.convert("RGB")
    scale = min(1.0, max_side / max(rgb.size))
    if scale < 1.0:
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.Resampling.LANCZOS)
    positive = np.clip(np.asarray(heat, dtype=np.float64), 0.0, None)
    peak = float(positive.max()) if positive.size else 0.0
    if peak <= 0.0:
        return rgb
    small = Image.fromarray((positive / peak).astype(np.float32), mode="F")
    smooth = np.asarray(small.resize(rgb.size, Image.Resampling.BILINEAR), dtype=np.float64).clip(0.0, 1.0)
    alpha = (strength * smooth)[..., None]
    painted = np.asarray(rgb, dtype=np.float64) * (1.0 - alpha) + heat_colours(smooth).astype(np.float64) * alpha
    return Image.fromarray(painted.round().astype(np.uint8), mode="RGB")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _check(grid: int, window: int) -> None:
    if not 1 <= grid <= MAX_GRID:
        raise OcclusionError(f"grid {grid}: use 1 to {MAX_GRID} cells per side")
    if not 1 <= window <= grid:
        raise OcclusionError(f"window {window}: use 1 to the grid size ({grid}) cells")
