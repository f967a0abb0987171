"""Occlusion sensitivity (tagger.explain) on synthetic images whose answer is known."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from tagger.explain import OcclusionError, cell_edges, occluded_variants, occlusion_map, overlay, png_bytes

SIZE = 64  # 8 px cells on an 8 x 8 grid


def red_patch_image() -> Image.Image:
    """White, with a pure red square over cells rows 1-2, columns 5-6 (pixels 8-24 x 40-56)."""
    pixels = np.full((SIZE, SIZE, 3), 255, dtype=np.uint8)
    pixels[8:24, 40:56] = (255, 0, 0)
    return Image.fromarray(pixels, mode="RGB")


def redness(images: Sequence[Image.Image]) -> np.ndarray:
    """Mean over the image of how much red exceeds the other channels, in [0, 1]."""
    scores = []
    for image in images:
        a = np.asarray(image, dtype=np.float64) / 255.0
        scores.append(float(np.clip(a[..., 0] - (a[..., 1] + a[..., 2]) / 2, 0, None).mean()))
    return np.asarray(scores)


def test_single_cell_windows_give_the_exact_drop_of_each_cell() -> None:
    calls: list[int] = []

    def scorer(images: Sequence[Image.Image]) -> np.ndarray:
        calls.append(len(images))
        return redness(images)

    result = occlusion_map(red_patch_image(), scorer, grid=8, window=1, fill="grey")
    assert calls == [65]  # the original and 64 covered copies, in one batch
    assert result.base_score == pytest.approx(16 * 16 / SIZE**2)
    # Covering one red cell (64 of 4096 pixels) removes 64/4096 of the redness; covering white removes none.
    expected = np.zeros((8, 8))
    expected[1:3, 5:7] = 64 / SIZE**2
    np.testing.assert_allclose(result.heat, expected, atol=1e-12)


def test_sliding_windows_peak_on_the_red_square() -> None:
    result = occlusion_map(red_patch_image(), redness, grid=8, window=2, fill="grey")
    row, col = np.unravel_index(np.argmax(result.heat), result.heat.shape)
    assert (1 <= row <= 2) and (5 <= col <= 6)
    # Cells two or more cells away from the square are never covered together with it.
    assert result.heat[5:, :3].max() == 0.0
    assert result.max_drop > 0


def test_mean_fill_uses_the_image_colour_and_covers_the_right_pixels() -> None:
    image = red_patch_image()
    variants, positions = occluded_variants(image, grid=4, window=1, fill="mean")
    assert len(variants) == len(positions) == 16
    mean = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0).round()
    covered = np.asarray(variants[positions.index((0, 2))])
    np.testing.assert_array_equal(covered[0:16, 32:48], np.broadcast_to(mean, (16, 16, 3)))
    np.testing.assert_array_equal(covered[16:, :], np.asarray(image)[16:, :])


def test_uneven_sizes_cover_every_pixel_once() -> None:
    edges = cell_edges(101, 7)
    assert edges[0] == 0 and edges[-1] == 101 and np.all(np.diff(edges) > 0)


def test_overlay_paints_only_where_the_score_dropped() -> None:
    image = red_patch_image()
    heat = np.zeros((8, 8))
    heat[6, 0] = 1.0  # bottom-left cell
    painted = np.asarray(overlay(image, heat, max_side=64), dtype=np.int16)
    original = np.asarray(image, dtype=np.int16)
    assert np.abs(painted[52, 4] - original[52, 4]).sum() > 30
    np.testing.assert_array_equal(painted[:24, 32:], original[:24, 32:])
    assert overlay(image, np.zeros((8, 8)), max_side=64).tobytes() == image.tobytes()
    decoded = Image.open(io.BytesIO(png_bytes(overlay(image, heat, max_side=32))))
    assert decoded.format == "PNG" and decoded.size == (32, 32)


@pytest.mark.parametrize("grid, window, fill, message", [
    (0, 1, "grey", "grid 0"), (8, 9, "grey", "window 9"), (8, 2, "blue", "fill 'blue'"),
    (8, 2, (300, 0, 0), "three integers"),
])
def test_bad_parameters_are_refused_clearly(grid: int, window: int, fill: object, message: str) -> None:
    with pytest.raises(OcclusionError, match=message):
        occlusion_map(red_patch_image(), redness, grid=grid, window=window, fill=fill)  # type: ignore[arg-type]


def test_a_scorer_answering_the_wrong_count_is_refused() -> None:
    with pytest.raises(OcclusionError, match="returned 1 scores for 5 images"):
        occlusion_map(red_patch_image(), lambda images: np.zeros(1), grid=2, window=1)
