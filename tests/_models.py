"""Small random-weight models, built and saved by transformers itself, for parity tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

import dinov2_fast

TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 56,
    "patch_size": 14,
}

_HF_CLASSES = {
    ("Dinov2Model", False): transformers.Dinov2Model,
    ("Dinov2ForImageClassification", False): transformers.Dinov2ForImageClassification,
    ("Dinov2Backbone", False): transformers.Dinov2Backbone,
    ("Dinov2Model", True): transformers.Dinov2WithRegistersModel,
    ("Dinov2ForImageClassification", True): transformers.Dinov2WithRegistersForImageClassification,
    ("Dinov2Backbone", True): transformers.Dinov2WithRegistersBackbone,
}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """‖ours − ref‖ / ‖ref‖ in float64 (DESIGN.md §4)."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter fresh random values: default ones and zeros hide bugs."""
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if param.dim() >= 2 and param.shape[-1] > 1 and param.shape[0] > 1:
            noise = noise / param[0].numel() ** 0.5
        elif param.dim() == 1:
            noise = noise * 0.5
        param.copy_(noise.to(param.dtype))
    return model


def hf_config(registers: int = 0, **fields: Any) -> transformers.PreTrainedConfig:
    fields = {**TINY, **fields}
    if registers:
        return transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **fields)
    return transformers.Dinov2Config(**fields)


def hf_model(
    kind: str = "Dinov2Model", registers: int = 0, seed: int = 0, **fields: Any
) -> torch.nn.Module:
    """A transformers model with random weights and the eager attention (returns probs)."""
    config = hf_config(registers, **fields)
    cls = _HF_CLASSES[kind, bool(registers)]
    model = cls._from_config(config, attn_implementation="eager")
    return randomize(model, seed).eval()


def hf_and_ours(
    tmp_path: Path, kind: str = "Dinov2Model", registers: int = 0, **fields: Any
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same random weights in transformers and in dinov2_fast, via save_pretrained."""
    hf = hf_model(kind, registers, **fields)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    ours = getattr(dinov2_fast, kind).from_pretrained(folder, backend="torch")
    return hf, ours
