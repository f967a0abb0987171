"""The encoder interface every model implements, and process-wide loading.

An encoder turns images and texts into L2-normalised float32 vectors in one shared space. It is
loaded once per process (a Celery worker child, the CLI) behind a lock, on first use.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
from PIL import Image


class Encoder(ABC):
    """Image and text towers behind one small interface.

    Subclasses set ``model_id`` (stored next to every vector it produces, so it must change when
    the weights change), ``dim`` and ``logit_scale`` (the model's softmax temperature, as CLIP's
    ``exp(logit_scale)``), and implement ``_load``, ``_encode_images`` and ``_encode_texts``.
    """

    model_id: str
    dim: int
    logit_scale: float = 100.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded = False

    def load(self) -> None:
        with self._lock:
            if not self._loaded:
                self._load()
                self._loaded = True

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Embed RGB images; returns an (n, dim) float32 array of unit vectors."""
        self.load()
        chunks = [self._encode_images(list(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
        return _normalised(chunks, self.dim)

    def encode_images_with_features(self, images: Sequence[Image.Image],
                                    batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Embed RGB images and return, from the same forward pass, the image features exemplar
        (few-shot) scoring uses: ``(embeddings (n, dim) unit vectors, features (n, feature_dim) float32)``."""
        self.load()
        pairs = [self._encode_image_features(list(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
        features = (np.concatenate([f for _, f in pairs]).astype(np.float32, copy=False) if pairs
                    else np.zeros((0, self.dim), dtype=np.float32))
        return _normalised([e for e, _ in pairs], self.dim), features

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embed texts; returns an (n, dim) float32 array of unit vectors."""
        self.load()
        chunks = [self._encode_texts(list(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
        return _normalised(chunks, self.dim)

    @abstractmethod
    def _load(self) -> None: ...

    @abstractmethod
    def _encode_images(self, images: list[Image.Image]) -> np.ndarray: ...

    @abstractmethod
    def _encode_texts(self, texts: list[str]) -> np.ndarray: ...

    def _encode_image_features(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """(raw embeddings, exemplar features); models without a separate backbone use the embedding for both."""
        embeddings = self._encode_images(images)
        return embeddings, embeddings


def _normalised(chunks: list[np.ndarray], dim: int) -> np.ndarray:
    if not chunks:
        return np.zeros((0, dim), dtype=np.float32)
    vectors = np.concatenate(chunks).astype(np.float32, copy=False)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


_cache: dict[tuple[str, str], Encoder] = {}
_cache_lock = threading.Lock()


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def get_encoder(model: str, device: str = "auto") -> Encoder:
    """The encoder for a model spec, created once per process.

    ``model`` is ``"default"`` (the offline model that ships with tagger), a hub id such as
    ``patrickjohncyh/fashion-clip``, or a local directory holding a CLIP checkpoint.
    """
    key = (model, device)
    with _cache_lock:
        encoder = _cache.get(key)
        if encoder is None:
            encoder = _create(model, resolve_device(device))
            _cache[key] = encoder
        return encoder


def _create(model: str, device: str) -> Encoder:
    if model == "default":
        from tagger.encoders.default import DefaultEncoder

        return DefaultEncoder(device=device)
    from tagger.encoders.clip import ClipEncoder

    return ClipEncoder(model, device=device)


def model_dimension(model: str) -> int:
    """The embedding dimension of a model spec, without loading its weights (migrations need it)."""
    if model == "default":
        from tagger.encoders import default

        return int(getattr(default, "DIM", 512))
    from transformers import CLIPConfig

    try:
        return int(CLIPConfig.from_pretrained(model).projection_dim)
    except (OSError, ValueError) as exc:
        from tagger.errors import ModelLoadError

        raise ModelLoadError(f"cannot read the configuration of model {model!r}: {exc}") from exc
