"""Any CLIP checkpoint through transformers: a hub id (e.g. ``patrickjohncyh/fashion-clip``) or a local dir."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from tagger.encoders.base import Encoder
from tagger.errors import ModelLoadError


class ClipEncoder(Encoder):
    """A CLIP model (FashionCLIP or any other) loaded with ``transformers``.

    The image processor is the Pillow one, so no torchvision is needed.
    """

    def __init__(self, source: str, device: str = "cpu") -> None:
        super().__init__()
        self.source = source
        self.device = device
        self.model_id = _model_id(source)
        self.dim = 0  # known after load
        self._model = None
        self._tokenizer = None
        self._processor = None
        self.load()  # dim and temperature come from the checkpoint; callers need them at once

    def _load(self) -> None:
        import torch
        from transformers import CLIPModel, CLIPTokenizerFast
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        try:
            self._model = CLIPModel.from_pretrained(self.source).to(self.device).eval()
            self._tokenizer = CLIPTokenizerFast.from_pretrained(self.source)
            self._processor = CLIPImageProcessorPil.from_pretrained(self.source)
        except (OSError, ValueError) as exc:
            hint = (
                "the directory does not hold a CLIP checkpoint (config.json, weights, tokenizer, preprocessor_config.json)"
                if Path(self.source).exists()
                else "it is neither a local directory nor a hub id that can be reached (set HF_HUB_OFFLINE=1 and "
                "download the checkpoint to a directory where the hub is unreachable)"
            )
            raise ModelLoadError(f"cannot load CLIP model {self.source!r}: {hint}. Cause: {exc}") from exc
        self.dim = int(self._model.config.projection_dim)
        self.logit_scale = float(torch.exp(self._model.logit_scale.detach()).cpu())
        self._torch = torch

    def _encode_images(self, images: list[Image.Image]) -> np.ndarray:
        inputs = self._processor(images=images, return_tensors="pt")
        with self._torch.inference_mode():
            out = self._model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device))
        return _as_array(out)

    def _encode_texts(self, texts: list[str]) -> np.ndarray:
        max_len = int(self._model.config.text_config.max_position_embeddings)
        inputs = self._tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        with self._torch.inference_mode():
            out = self._model.get_text_features(
                input_ids=inputs["input_ids"].to(self.device), attention_mask=inputs["attention_mask"].to(self.device)
            )
        return _as_array(out)


def _as_array(out: object) -> np.ndarray:
    # transformers 5 returns an output object whose embedding is pooler_output; older versions a tensor.
    tensor = getattr(out, "pooler_output", out)
    return tensor.detach().float().cpu().numpy()


def _model_id(source: str) -> str:
    """``clip:<hub id>`` for hub models; local dirs add a hash of their weights so retrained copies differ."""
    path = Path(source)
    if not path.is_dir():
        return f"clip:{source}"
    digest = hashlib.sha256()
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}".encode())
        with open(weights, "rb") as fh:
            digest.update(fh.read(1 << 20))  # the first MiB differs between any two trainings
    return f"clip:{path.name}@{digest.hexdigest()[:10]}"


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked Celery children must not inherit tokenizer threads
