"""From images to pooled features: the decoding dataset, its batches, the forward, the pooling.

Both the command line (``runner``) and ``dinov2_fast.embed`` go through ``iter_features``:
decoding processes turn each item into its uint8 crop, batches of crops cross to the model's
device (pinned, without blocking), and are normalised and embedded there.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from .._resolve import first_line
from .preprocess import crop_pixels, load_image, normalize, resize_size_for
from .sources import read_input

__all__ = [
    "ImageItem",
    "StageTimes",
    "crop_batches",
    "embed_crops",
    "feature_shape",
    "iter_features",
    "pool_output",
]

# What one row is made from: a path (a file, or a tar member keyed TAR::MEMBER) or the file's
# bytes, or pixels.
ImageItem = str | os.PathLike | bytes | Image.Image | np.ndarray | torch.Tensor


@dataclass
class StageTimes:
    """Seconds spent per stage, summed over the decoding processes for read and decode."""

    read: float = 0.0
    decode: float = 0.0
    model: float = 0.0
    write: float = 0.0
    images: int = 0
    started: float = field(default_factory=time.perf_counter)

    def summary(self, workers: int) -> str:
        wall = time.perf_counter() - self.started
        where = f"over {workers} decoding processes" if workers else "in this process"
        rate = self.images / wall if wall > 0 else 0.0
        return (
            f"time: read {self.read:.1f} s and decode+resize {self.decode:.1f} s ({where}), "
            f"model {self.model:.1f} s, write {self.write:.1f} s; "
            f"{self.images} images in {wall:.1f} s ({rate:.1f} images/s)"
        )


def _array_image(pixels: np.ndarray) -> Image.Image:
    """uint8 pixels, HxW, HxWxC or CxHxW with 1, 3 or 4 channels, as a PIL image."""
    if pixels.dtype != np.uint8:
        raise TypeError(f"pixel arrays must be uint8 (0-255), got {pixels.dtype}")
    if pixels.ndim == 3 and pixels.shape[-1] not in (1, 3, 4) and pixels.shape[0] in (1, 3, 4):
        pixels = pixels.transpose(1, 2, 0)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] not in (3, 4)):
        raise TypeError(f"pixel arrays must be HxW, HxWxC or CxHxW images, got {pixels.shape}")
    return Image.fromarray(np.ascontiguousarray(pixels))


def _open(item: ImageItem, draft_size: int | None) -> tuple[Image.Image, float]:
    """The item as a decoded PIL image, and the seconds spent reading its file."""
    if isinstance(item, Image.Image):
        return item, 0.0
    if isinstance(item, torch.Tensor):
        return _array_image(item.detach().cpu().numpy()), 0.0
    if isinstance(item, np.ndarray):
        return _array_image(item), 0.0
    started = time.perf_counter()
    data = item if isinstance(item, bytes) else read_input(item)
    read = time.perf_counter() - started
    return load_image(io.BytesIO(data), draft_size=draft_size), read


class _Crops(Dataset):
    """uint8 crops of some rows, with read and decode times; a failure yields its reason."""

    def __init__(
        self, items: Sequence[ImageItem], rows: np.ndarray, crop_size: int, decode: str
    ) -> None:
        self.items = items
        self.rows = rows
        self.crop_size = crop_size
        self.draft_size = resize_size_for(crop_size) if decode == "fast" else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None, float, float]:
        row = int(self.rows[index])
        pixels, reason, read = None, None, 0.0
        started = time.perf_counter()
        try:
            image, read = _open(self.items[row], self.draft_size)
            pixels = torch.from_numpy(crop_pixels(image, self.crop_size))
        except UnidentifiedImageError:
            # Its own message names the in-memory buffer the file was read into.
            reason = "cannot identify the image format (not an image Pillow reads)"
        # Decoders of damaged files raise nearly anything (OSError, SyntaxError, struct.error,
        # DecompressionBombError...); every one of them means "skip this file".
        except Exception as err:
            reason = first_line(err)
        return row, pixels, reason, read, time.perf_counter() - started - read


def _collate(items: list[tuple[int, torch.Tensor | None, str | None, float, float]]):
    read = [(row, pixels) for row, pixels, *_ in items if pixels is not None]
    failed = [(row, reason) for row, pixels, reason, *_ in items if pixels is None]
    batch = torch.stack([pixels for _, pixels in read]) if read else None
    seconds = (sum(item[3] for item in items), sum(item[4] for item in items))
    return [row for row, _ in read], batch, failed, seconds


def feature_shape(pool: str, hidden_size: int, patch_size: int, crop_size: int) -> list[int]:
    if pool == "patch":
        return [(crop_size // patch_size) ** 2, hidden_size]
    return [2 * hidden_size if pool == "cls+mean" else hidden_size]


def pool_output(output: Any, pool: str, prefix_tokens: int) -> torch.Tensor:
    """CLS after the final norm, mean of patch tokens, both, or the patch tokens themselves."""
    if pool == "cls":
        return output.pooler_output
    patches = output.last_hidden_state[:, prefix_tokens:]
    if pool == "patch":
        return patches
    mean = patches.float().mean(dim=1)
    return mean if pool == "mean" else torch.cat([output.pooler_output.float(), mean], dim=-1)


def embed_crops(model: torch.nn.Module, pixels: torch.Tensor, pool: str) -> torch.Tensor:
    """uint8 crops ``(n, 3, S, S)`` to their pooled features, on the model's device (call
    under ``torch.inference_mode``)."""
    # transformers' plain Dinov2Config has no registers field.
    prefix_tokens = 1 + getattr(model.config, "num_register_tokens", 0)
    pixels = normalize(pixels.to(model.device, non_blocking=True))
    output = model(pixel_values=pixels.to(model.dtype))
    return pool_output(output, pool, prefix_tokens)


def crop_batches(
    items: Sequence[ImageItem],
    rows: np.ndarray,
    *,
    crop_size: int,
    decode: str,
    batch_size: int,
    workers: int,
    pin_memory: bool = False,
) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]], tuple[float, float]]]:
    """Per batch, from ``workers`` decoding processes (0: this one): the rows read, their uint8
    crops ``(n, 3, S, S)``, the rows that could not be read with the reason, and the
    seconds spent reading and decoding."""
    return iter(
        DataLoader(
            _Crops(items, rows, crop_size, decode),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=pin_memory,
        )
    )


def iter_features(
    model: torch.nn.Module,
    items: Sequence[ImageItem],
    rows: np.ndarray,
    *,
    pool: str,
    crop_size: int,
    decode: str,
    batch_size: int,
    workers: int,
    times: StageTimes,
) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
    """Per batch: the rows read, their pooled features (on the model's device), and the rows
    that could not be read with the reason. ``times`` gathers the stages' seconds."""
    on_gpu = model.device.type == "cuda"
    batches = crop_batches(
        items,
        rows,
        crop_size=crop_size,
        decode=decode,
        batch_size=batch_size,
        workers=workers,
        pin_memory=on_gpu,
    )
    with torch.inference_mode():
        for read_rows, pixels, failed, (read, decoded) in batches:
            times.read += read
            times.decode += decoded
            pooled = None
            if read_rows:
                started = time.perf_counter()
                pooled = embed_crops(model, pixels, pool)
                if on_gpu:
                    torch.cuda.synchronize(model.device)  # so the model's time is its own
                times.model += time.perf_counter() - started
            times.images += len(read_rows) + len(failed)
            yield read_rows, pooled, failed
