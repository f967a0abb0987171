"""Projection heads from frozen features into the shared 512-d space, and their (de)serialisation.

Each tower is ``linear(x) + mlp(x)`` on standardised input: the linear path keeps the backbone's
information reachable (robustness off the training distribution), the small MLP adds the
non-linear alignment. Input standardisation statistics are stored with the weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class Tower(nn.Module):
    def __init__(self, in_dim: int, out_dim: int = 512, hidden: int = 1024, dropout: float = 0.2,
                 input_dropout: float = 0.1) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.input_dropout = nn.Dropout(input_dropout)
        self.linear = nn.Linear(in_dim, out_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_dropout((x - self.mean) / self.std)
        return self.linear(x) + self.mlp(x)


class DualHeads(nn.Module):
    """Image and text towers plus the learned temperature (log scale, as in CLIP)."""

    def __init__(self, image_in: int, text_in: int, dim: int = 512, hidden: int = 1024, dropout: float = 0.2,
                 input_dropout: float = 0.1) -> None:
        super().__init__()
        self.image = Tower(image_in, dim, hidden, dropout, input_dropout)
        self.text = Tower(text_in, dim, hidden, dropout, input_dropout)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def scale(self) -> torch.Tensor:
        # CLIP clamps the scale at 100 to keep the softmax from collapsing.
        return self.logit_scale.exp().clamp(max=100.0)


def save_heads(heads: DualHeads, out_dir: Path, config: dict) -> None:
    """Write ``heads.safetensors`` (fp16 weights, fp32 stats) and ``config.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, value in heads.state_dict().items():
        value = value.detach().cpu().contiguous()
        # Half precision halves the shipped size; standardisation stats and temperature stay fp32.
        keep32 = name.endswith(("mean", "std")) or name == "logit_scale"
        tensors[name] = value.float() if keep32 else value.half()
    save_file(tensors, str(out_dir / "heads.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_heads(model_dir: Path, device: str = "cpu") -> tuple[DualHeads, dict]:
    config = json.loads((model_dir / "config.json").read_text())
    h = config["heads"]
    heads = DualHeads(h["image_in"], h["text_in"], config["dim"], h["hidden"], 0.0, 0.0)
    state = {k: v.float() for k, v in load_file(str(model_dir / "heads.safetensors")).items()}
    heads.load_state_dict(state)
    return heads.to(device).eval(), config
