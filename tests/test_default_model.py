"""The offline default model: shipped weights load, odd images embed sanely, training runs end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tagger.encoders.default import MODEL_DIR, DefaultEncoder
from tagger.encoders.preprocess import HIST_DIM, colour_histogram, foreground_mask, pad_to_square
from tagger.modeling.train import DEFAULT_DATA, main

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "heads.safetensors").exists(), reason="no shipped weights")


@pytest.fixture(scope="module")
def encoder() -> DefaultEncoder:
    enc = DefaultEncoder(device="cpu")
    enc.load()
    return enc


def _odd_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    tiny = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    strip = Image.new("RGB", (1000, 100), (250, 250, 250))
    strip.paste((200, 20, 20), (450, 10, 550, 90))
    grey = Image.fromarray(rng.integers(0, 255, (120, 90), dtype=np.uint8), mode="L").convert("RGB")
    tall = Image.new("RGB", (60, 600), (0, 0, 128))
    return [tiny, strip, grey, tall]


def test_metadata(encoder: DefaultEncoder) -> None:
    assert encoder.dim == 512
    assert encoder.model_id.startswith("tagger-fashion-v")
    assert 1.0 < encoder.logit_scale <= 100.0


def test_odd_images_give_unit_vectors_deterministically(encoder: DefaultEncoder) -> None:
    images = _odd_images()
    a = encoder.encode_images(images)
    b = encoder.encode_images(images)
    assert a.shape == (len(images), 512) and a.dtype == np.float32
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a, b)
    # Images one at a time give the same vectors as a batch (no cross-talk through batching).
    single = np.concatenate([encoder.encode_images([im]) for im in images])
    np.testing.assert_allclose(single, a, atol=1e-4)


def test_texts_and_backbone(encoder: DefaultEncoder) -> None:
    t = encoder.encode_texts(["red dress", "men's black leather belt", ""])
    assert t.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    f = encoder.encode_backbone(_odd_images()[:2])
    assert f.shape == (2, 1280) and np.all(np.isfinite(f))
    assert encoder.encode_images([]).shape == (0, 512)


def test_preprocess_helpers() -> None:
    im = Image.new("RGB", (40, 10), (255, 255, 255))
    im.paste((0, 200, 0), (15, 2, 25, 8))
    sq = pad_to_square(im)
    assert sq.size == (40, 40) and sq.getpixel((0, 0)) == (255, 255, 255)
    assert 0.05 < foreground_mask(im).mean() < 0.5
    h = colour_histogram(im)
    assert h.shape == (HIST_DIM,) and abs(float((h**2).sum()) - 1.0) < 1e-4


@pytest.mark.skipif(not (DEFAULT_DATA / "styles.parquet").exists(), reason="KAGL data not available")
def test_train_tiny_subset_writes_loadable_weights(tmp_path: Path) -> None:
    out = tmp_path / "model"
    rc = main(["--limit", "48", "--epochs", "1", "--n-aug", "1", "--batch-size", "32", "--no-eval",
               "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    assert (out / "heads.safetensors").stat().st_size < 10 * 2**20
    enc = DefaultEncoder(model_dir=out)
    assert enc.model_id.startswith("tagger-fashion-v")
    v = enc.encode_images(_odd_images()[:1])
    assert v.shape == (1, 512)
