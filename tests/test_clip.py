"""The transformers loading path users take for FashionCLIP, exercised with a tiny random CLIP saved locally."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tagger.encoders.base import get_encoder, model_dimension
from tagger.encoders.clip import ClipEncoder
from tagger.errors import ModelLoadError


def test_tiny_clip_loads_through_the_user_path(tiny_clip_dir: Path) -> None:
    encoder = get_encoder(str(tiny_clip_dir), "cpu")
    assert encoder is get_encoder(str(tiny_clip_dir), "cpu")  # loaded once per process
    assert isinstance(encoder, ClipEncoder)
    assert encoder.dim == 512 == model_dimension(str(tiny_clip_dir))
    assert encoder.model_id.startswith("clip:tiny-clip@")
    images = [Image.new("RGB", (64, 48), "red"), Image.new("RGB", (5, 300), "blue"), Image.new("RGB", (1, 1))]
    vectors = encoder.encode_images(images)
    texts = encoder.encode_texts(["a red dress", "blue jeans", ""])
    assert vectors.shape == (3, 512) and texts.shape == (3, 512)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])  # different inputs, different embeddings
    np.testing.assert_allclose(encoder.encode_images(images[:1])[0], vectors[0], atol=1e-5)  # deterministic
    assert encoder.logit_scale > 1.0


def test_a_retrained_checkpoint_gets_a_new_model_id(tiny_clip_dir: Path, tmp_path: Path) -> None:
    from tests.tiny_clip import make_tiny_clip

    other = make_tiny_clip(tmp_path / "tiny-clip", seed=1)
    assert ClipEncoder(str(other)).model_id != ClipEncoder(str(tiny_clip_dir)).model_id


def test_unloadable_model_has_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="does not hold a CLIP checkpoint"):
        ClipEncoder(str(tmp_path / "empty"))
