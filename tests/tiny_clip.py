"""Builds a tiny randomly initialised CLIP checkpoint on disk, to test the transformers loading path offline."""

from __future__ import annotations

import json
from pathlib import Path

PROJECTION_DIM = 512  # same as the default model, so the tiny CLIP fits the same database schema


def make_tiny_clip(directory: Path, seed: int = 0, projection_dim: int = PROJECTION_DIM) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    # A byte-level BPE vocabulary: every printable byte symbol, with and without the end-of-word marker.
    symbols = [chr(c) for c in range(33, 127)]
    vocab: dict[str, int] = {}
    for tok in ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(tok, len(vocab))
    merges = ["r e", "re d</w>", "d r", "dr e", "dre s", "dres s</w>"]
    for merge in merges:
        vocab.setdefault("".join(merge.split()), len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizerFast.from_pretrained(directory)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 32,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=projection_dim,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory
