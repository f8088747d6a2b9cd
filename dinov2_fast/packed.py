"""Images of different sizes in one forward: ``model(pixel_values=[img_0, img_1, ...])``.

Each ``(C, H_i, W_i)`` image gets its own patch grid and position table (from the cached
resize), and its outputs equal that image run alone. The PyTorch path runs them one at a
time (exact by construction); the fused path packs every image's tokens into one ``(T, D)``
stream, so each GEMM, norm and FFN op runs once over all T rows and attention is varlen on
``cu_seqlens`` (one launch per fused op for the whole list, no padding).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import fused

__all__ = ["check_images", "encode_images", "is_image_list"]


def is_image_list(pixel_values: Any) -> bool:
    return isinstance(pixel_values, (list, tuple))


def check_images(images: Any, masks: Any, config: Any, has_mask_token: bool) -> None:
    """Refuse a list the model cannot run, naming the first bad item and what is accepted."""
    accepted = "a non-empty list of (C, H, W) float tensors on one device, of one dtype"
    if len(images) == 0:
        raise ValueError(f"pixel_values is an empty list; pass {accepted}")
    first = images[0]
    patch = config.patch_size
    for i, image in enumerate(images):
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"pixel_values[{i}] is a {type(image).__name__}; pass {accepted}")
        if image.dim() != 3:
            raise ValueError(
                f"pixel_values[{i}] has shape {tuple(image.shape)}; each item is one (C, H, W) "
                "image (a batch of one size is a 4-D tensor, not a list item)"
            )
        if not image.is_floating_point():
            raise TypeError(f"pixel_values[{i}] is {image.dtype}; pass floating-point images")
        if image.shape[0] != config.num_channels:
            raise ValueError(
                f"pixel_values[{i}] has {image.shape[0]} channels; this model expects "
                f"{config.num_channels} (config.num_channels)"
            )
        if image.shape[1] < patch or image.shape[2] < patch:
            raise ValueError(
                f"pixel_values[{i}] is {image.shape[1]}x{image.shape[2]}, smaller than one "
                f"{patch}x{patch} patch"
            )
        if image.device != first.device or image.dtype != first.dtype:
            raise ValueError(
                f"pixel_values[{i}] is {image.dtype} on {image.device}, pixel_values[0] "
                f"{first.dtype} on {first.device}: {accepted}"
            )
    if masks is None:
        return
    if not is_image_list(masks) or len(masks) != len(images):
        raise TypeError(
            "with a list of images, bool_masked_pos must be a list of as many per-image "
            "masks (bool tensors of shape (patches,)), or None"
        )
    if not has_mask_token:
        raise ValueError("bool_masked_pos needs a mask token, but config.use_mask_token=False")
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        patches = (image.shape[1] // patch) * (image.shape[2] // patch)
        if (
            not isinstance(mask, torch.Tensor)
            or mask.dtype != torch.bool
            or tuple(mask.shape) != (patches,)
        ):
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else mask
            raise ValueError(
                f"bool_masked_pos[{i}] must be a bool tensor of shape ({patches},) (the "
                f"patches of pixel_values[{i}]), got {got}"
            )


def encode_images(
    model: nn.Module,
    images: Any,
    masks: Any,
    head_scales: list[torch.Tensor | None],
    output_attentions: bool,
    output_hidden_states: bool,
) -> tuple[tuple[torch.Tensor, ...], Any, Any, str]:
    """``model._encode`` for a list of images: per image the final LayerNorm of its tokens
    ``(1 + registers + n_i, D)``; per layer a tuple of per-image hidden states and
    attention probabilities when asked for; and the backend that ran."""
    masks = [None] * len(images) if masks is None else masks
    backend = model._fused_backend(images[0], output_attentions)
    if backend is None:
        runs = [
            model._encode(
                image[None], None if mask is None else mask[None], head_scales,
                output_attentions, output_hidden_states,
            )
            for image, mask in zip(images, masks, strict=True)
        ]  # fmt: skip
        normed = tuple(run[0][0] for run in runs)
        return normed, _per_layer(runs, 1), _per_layer(runs, 2), "torch"
    embedded = [
        model.embeddings(image[None], None if mask is None else mask[None])[0]
        for image, mask in zip(images, masks, strict=True)
    ]
    lengths = [e.shape[0] for e in embedded]
    tokens = torch.cat(embedded)
    packing = fused.Packing(lengths, tokens.device)
    layers = model.encoder.layer
    with fused.on_device(tokens.device):
        run = fused.executor_for(
            model, model.config, layers, model.layernorm, tokens, backend, packing
        )
        normed, hidden_states = fused.run_blocks(
            layers, run, tokens, head_scales, output_hidden_states, model.layernorm, packing
        )
    if hidden_states is not None:
        hidden_states = tuple(tuple(state.split(lengths)) for state in hidden_states)
    return tuple(normed.split(lengths)), hidden_states, None, backend


def _per_layer(runs: list[tuple[Any, ...]], field: int) -> Any:
    """Per-image runs' per-layer outputs regrouped: per layer, a tuple over the images."""
    if runs[0][field] is None:
        return None
    return tuple(tuple(run[field][i][0] for run in runs) for i in range(len(runs[0][field])))
