"""``dinov2_fast.embed``: images in memory or on disk to a tensor of features, in one call."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .._resolve import (
    POOLS,
    UserError,
    check_image_size,
    load_model,
    quoted,
    resolve_device,
    resolve_dtype,
)
from ..modeling import Dinov2PreTrainedModel
from .engine import ImageItem, StageTimes, check_max_tokens, iter_features
from .preprocess import check_crop, check_decode

__all__ = ["embed"]


def _describe(index: int, item: ImageItem) -> str:
    if isinstance(item, (str, os.PathLike)):
        return f"image {index} ({quoted(item)})"
    return f"image {index} ({type(item).__name__})"


def embed(
    images: Sequence[ImageItem],
    model: str | torch.nn.Module,
    *,
    pool: str = "cls",
    batch_size: int | None = None,
    crop_size: int = 224,
    decode: str = "exact",
    workers: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    backend: str = "auto",
    crop: str = "center",
    max_tokens: int | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """Embed ``images`` with a DINOv2 model; returns float32 features on the CPU, one row per
    image in order: ``(N, D)`` (``(N, 2D)`` for ``cls+mean``, ``(N, patches, D)`` for
    ``patch``; with ``crop="none"``, a list of each image's ``(h, w, D)`` patch grid).

    ``crop``, ``crop_size`` (``--size``), ``batch_size`` (default 64, or no cap with
    ``max_tokens``) and ``max_tokens`` are the command line's ``--crop``, ``--size``,
    ``--batch-size`` and ``--max-tokens``; ``crop="none"`` needs a dinov2_fast model.

    ``images`` may mix file paths, a file's bytes, PIL images, and uint8 numpy arrays or
    tensors (HxW, HxWxC or CxHxW). They go through the command line's pipeline (the same
    code): transformers' ``BitImageProcessor`` pixels, normalised on the model's device.
    ``model`` is a loaded model (dinov2_fast's or transformers' DINOv2, used where it is) or
    what ``dinov2-fast embed --model`` takes (then ``device``, ``dtype`` and ``backend``
    apply). ``workers`` decoding processes (0: in this process). An image that cannot be
    read raises ``ValueError`` naming it.
    """
    if isinstance(images, (str, bytes, os.PathLike, Image.Image)):
        raise TypeError("images must be a list of images, not one image: pass [image]")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    for name, value in (("batch_size", batch_size), ("max_tokens", max_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    try:
        check_decode(decode, device if isinstance(model, str) else model.device.type)
        check_crop(crop, decode)
        if isinstance(model, str):
            torch_device = resolve_device(device)
            torch_dtype = resolve_dtype(dtype, torch_device)
            model = load_model(model, dtype=torch_dtype, device=torch_device, backend=backend)
        check_image_size(crop_size, model.config.patch_size, "crop_size")
        check_max_tokens(max_tokens, crop_size, model)
    except UserError as err:
        raise ValueError(str(err)) from None
    if crop == "none" and not isinstance(model, Dinov2PreTrainedModel):
        raise ValueError(
            "crop='none' runs images of different sizes in one batch, which only dinov2_fast's "
            f"models take; got a {type(model).__name__} (load it with dinov2_fast)"
        )
    items = list(images)
    rows = np.arange(len(items))
    features: list[torch.Tensor | None] = [None] * len(items)
    for read_rows, pooled, failed in iter_features(
        model,
        items,
        rows,
        pool=pool,
        crop_size=crop_size,
        decode=decode,
        batch_size=batch_size,
        workers=workers,
        times=StageTimes(),
        crop=crop,
        max_tokens=max_tokens,
    ):
        if failed:
            row, reason = failed[0]
            raise ValueError(f"{_describe(row, items[row])} cannot be read: {reason}")
        # Rows come in batches of their own order under crop="none".
        if pooled is not None:
            for row, values in zip(read_rows, pooled, strict=True):
                features[row] = values.float().cpu()
    if not features:
        raise ValueError("no images given")
    if crop == "none" and pool == "patch":
        return features
    return torch.stack(features)
