"""From images to pooled features: the decoding dataset, its batches, the forward, the pooling.

Both the command line (``runner``) and ``dinov2_fast.embed`` go through ``iter_features``:
decoding processes turn each item into its uint8 crop, batches of crops cross to the model's
device (pinned, without blocking), and are normalised and embedded there. With ``--decode
gpu`` JPEGs cross undecoded and ``gpu_decode`` decodes and resizes them on the device.

With ``crop="none"`` each image keeps its own size, known only once decoded, so batches are
formed in this process (``_packed_batches``): decoded images gather in a window of several
batches' worth, sorted by size, from which batches are cut by the token budget
(``max_tokens``) and the image cap (``batch_size``) one at a time as the decoding processes
refill it; a batch of one size runs as a tensor, a mixed one as a list (the model's packed
path). The window bounds the memory held.
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

from .._resolve import UserError, first_line
from .gpu_decode import Batch, DeviceJpeg, decoded_batches, device_jpeg
from .preprocess import (
    crop_pixels,
    load_image,
    normalize,
    resize_pixels,
    resize_size_for,
    uncropped_shape,
)
from .sources import read_input

__all__ = [
    "ImageItem",
    "StageTimes",
    "DEFAULT_BATCH_SIZE",
    "check_max_tokens",
    "crop_batches",
    "cut_batches",
    "embed_crops",
    "feature_shape",
    "image_tokens",
    "iter_features",
    "pool_output",
]

# What one row is made from: a path (a file, or a tar member keyed TAR::MEMBER) or the file's
# bytes, or pixels.
ImageItem = str | os.PathLike | bytes | Image.Image | np.ndarray | torch.Tensor

# Images per batch when neither a --batch-size nor a --max-tokens is given.
DEFAULT_BATCH_SIZE = 64
# A --crop none window holds this many batches' worth of decoded images before it is sorted
# by size and cut: enough for same-size images to meet, few enough to bound the memory.
_WINDOW_BATCHES = 8
# Decoded images a decoding process hands over at once under --crop none; with the
# DataLoader's prefetch of two such lists per process, the decoding runs ahead of the model by
# about as many images as a --crop center run's two batches of 64 per process.
_FETCH = 64


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


def _open(
    item: ImageItem, draft_size: int | None, jpeg_crop: int | None
) -> tuple[Image.Image | DeviceJpeg, float]:
    """The item as a decoded PIL image, and the seconds spent reading its file. With
    ``jpeg_crop`` (``--decode gpu``, the crop size), a JPEG file comes undecoded, for the
    device."""
    if isinstance(item, Image.Image):
        return item, 0.0
    if isinstance(item, torch.Tensor):
        return _array_image(item.detach().cpu().numpy()), 0.0
    if isinstance(item, np.ndarray):
        return _array_image(item), 0.0
    started = time.perf_counter()
    data = item if isinstance(item, bytes) else read_input(item)
    read = time.perf_counter() - started
    jpeg = None if jpeg_crop is None else device_jpeg(data, jpeg_crop)
    if jpeg is not None:
        return jpeg, read
    return load_image(io.BytesIO(data), draft_size=draft_size), read


def image_tokens(height: int, width: int, patch_size: int, prefix_tokens: int) -> int:
    """The tokens one image of ``height`` x ``width`` pixels takes in a forward: CLS and
    registers (``prefix_tokens``) and its patches."""
    return prefix_tokens + (height // patch_size) * (width // patch_size)


def check_max_tokens(max_tokens: int | None, crop_size: int, model: torch.nn.Module) -> None:
    """Refuse a token budget that holds no image: a square ``crop_size`` image is the least
    an image takes (its shortest edge is resized to it)."""
    if max_tokens is None:
        return
    prefix_tokens = 1 + getattr(model.config, "num_register_tokens", 0)
    least = image_tokens(crop_size, crop_size, model.config.patch_size, prefix_tokens)
    if max_tokens < least:
        raise UserError(
            f"--max-tokens {max_tokens} holds no image: one {crop_size}x{crop_size} image "
            f"takes {least} tokens ({prefix_tokens} + its patches) with this model; use "
            f"{least} or more"
        )


@dataclass(frozen=True)
class _Uncropped:
    """``--crop none``: the patch, the tokens before the patches, the token budget."""

    patch_size: int
    prefix_tokens: int
    max_tokens: int | None

    def pixels(self, image: Image.Image, size: int) -> np.ndarray:
        height, width = uncropped_shape(image.height, image.width, size, self.patch_size)
        tokens = image_tokens(height, width, self.patch_size, self.prefix_tokens)
        # Checked before the resize: an extreme aspect ratio can be gigapixels once resized.
        if self.max_tokens is not None and tokens > self.max_tokens:
            raise ValueError(
                f"resized to {height}x{width} it takes {tokens} tokens, more than "
                f"--max-tokens {self.max_tokens}"
            )
        return resize_pixels(image, size, self.patch_size)


class _Crops(Dataset):
    """uint8 crops (``uncropped``: whole resized images) of some rows, with read and decode
    times; a failure yields its reason."""

    def __init__(
        self,
        items: Sequence[ImageItem],
        rows: np.ndarray,
        crop_size: int,
        decode: str,
        uncropped: _Uncropped | None = None,
    ) -> None:
        self.items = items
        self.rows = rows
        self.crop_size = crop_size
        self.uncropped = uncropped
        # Drafted no smaller than the resize: the checkpoints' ratio, or --size uncropped.
        resize = crop_size if uncropped else resize_size_for(crop_size)
        self.draft_size = resize if decode == "fast" else None
        # --decode gpu takes centre crops only (check_crop refuses it with --crop none).
        self.jpeg_crop = crop_size if decode == "gpu" else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(
        self, index: int
    ) -> tuple[int, torch.Tensor | DeviceJpeg | None, str | None, float, float]:
        row = int(self.rows[index])
        pixels, reason, read = None, None, 0.0
        started = time.perf_counter()
        try:
            image, read = _open(self.items[row], self.draft_size, self.jpeg_crop)
            if isinstance(image, DeviceJpeg):
                pixels = image
            elif self.uncropped is None:
                pixels = torch.from_numpy(crop_pixels(image, self.crop_size))
            else:
                pixels = torch.from_numpy(self.uncropped.pixels(image, self.crop_size))
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
    batch = [pixels for _, pixels in read]
    if not any(isinstance(pixels, DeviceJpeg) for pixels in batch):
        batch = torch.stack(batch) if batch else None
    # else a list, crops and JPEGs that gpu_decode.decoded_batches decodes on the device.
    seconds = (sum(item[3] for item in items), sum(item[4] for item in items))
    return [row for row, _ in read], batch, failed, seconds


def feature_shape(
    pool: str, hidden_size: int, patch_size: int, crop_size: int, crop: str = "center"
) -> list[int | None]:
    """One row's shape; ``[None, D]`` for ragged rows (patches of uncropped images)."""
    if pool == "patch":
        return [None if crop == "none" else (crop_size // patch_size) ** 2, hidden_size]
    return [2 * hidden_size if pool == "cls+mean" else hidden_size]


def pool_output(output: Any, pool: str, prefix_tokens: int) -> torch.Tensor | list[torch.Tensor]:
    """CLS after the final norm, mean of patch tokens, both, or the patch tokens themselves
    (for a list of images, a list of each one's ``(patches, D)``)."""
    if pool == "cls":
        return output.pooler_output
    hidden = output.last_hidden_state
    if isinstance(hidden, tuple):  # a list of images: one tensor of tokens per image
        patches = [tokens[prefix_tokens:] for tokens in hidden]
        if pool == "patch":
            return patches
        mean = torch.stack([tokens.float().mean(dim=0) for tokens in patches])
    else:
        patches = hidden[:, prefix_tokens:]
        if pool == "patch":
            return patches
        mean = patches.float().mean(dim=1)
    return mean if pool == "mean" else torch.cat([output.pooler_output.float(), mean], dim=-1)


def _grids(pooled: torch.Tensor | list[torch.Tensor], pixels: Any, patch: int):
    """Patch features of uncropped images as a list of each one's ``(h, w, D)`` grid."""
    shapes = [image.shape[-2:] for image in pixels]
    return [
        features.reshape(height // patch, width // patch, -1)
        for features, (height, width) in zip(pooled, shapes, strict=True)
    ]


def _packed_batches(
    items: Sequence[ImageItem],
    rows: np.ndarray,
    *,
    crop_size: int,
    decode: str,
    uncropped: _Uncropped,
    max_images: int | None,
    workers: int,
    pin_memory: bool,
) -> Iterator[tuple[list[int], Any, list[tuple[int, str]], tuple[float, float]]]:
    """``crop_batches`` for uncropped images: per batch, the rows read, their pixels (a
    tensor when they share a size, else a list), the failures and seconds since the last.

    A batch holds at most ``uncropped.max_tokens`` tokens and ``max_images`` images. Decoded
    images gather in a window of ``_WINDOW_BATCHES`` batches' worth; while it is full, it is
    sorted by size and its first batch cut off and yielded, so the batches of the run are
    mostly of one size, and the window bounds the images held.
    """
    loader = DataLoader(
        _Crops(items, rows, crop_size, decode, uncropped),
        batch_size=_FETCH,
        num_workers=workers,
        collate_fn=list,
        pin_memory=pin_memory,
    )
    patch, prefix, budget = uncropped.patch_size, uncropped.prefix_tokens, uncropped.max_tokens
    window_tokens = None if budget is None else _WINDOW_BATCHES * budget
    window_images = None if max_images is None else _WINDOW_BATCHES * max_images
    pending: list[tuple[int, int, torch.Tensor]] = []  # (tokens, row, pixels)
    failed: list[tuple[int, str]] = []
    seconds = [0.0, 0.0]

    def window_full() -> bool:
        tokens = sum(item[0] for item in pending)
        return (window_tokens is not None and tokens >= window_tokens) or (
            window_images is not None and len(pending) >= window_images
        )

    def take(final: bool):
        """The window's first batch once sorted by size (all of them if ``final``)."""
        nonlocal pending, failed, seconds
        pending.sort(key=lambda item: tuple(item[2].shape[1:]))
        cuts = cut_batches([tokens for tokens, _, _ in pending], budget, max_images)
        batches = [[pending[i] for i in batch] for batch in cuts]
        if not final:
            batches, pending = batches[:1], [item for batch in batches[1:] for item in batch]
        elif not batches and failed:
            batches = [[]]
        for batch in batches:
            images = [pixels for _, _, pixels in batch]
            same = len({image.shape for image in images}) == 1
            stacked = torch.stack(images) if same else images or None
            if same and pin_memory:  # the stack is a new tensor: pinned, it copies async
                stacked = stacked.pin_memory()
            yield [row for _, row, _ in batch], stacked, failed, tuple(seconds)
            failed, seconds = [], [0.0, 0.0]

    for chunk in loader:
        for row, pixels, reason, read, decoded in chunk:
            seconds[0] += read
            seconds[1] += decoded
            if pixels is None:
                failed.append((row, reason))
            else:
                tokens = image_tokens(*pixels.shape[1:], patch, prefix)
                pending.append((tokens, row, pixels))
        # One batch at a time while the window is full, so that the decoding processes
        # refill it while each batch runs.
        while window_full():
            yield from take(final=False)
    yield from take(final=True)


def cut_batches(
    tokens: Sequence[int], max_tokens: int | None, max_images: int | None
) -> list[list[int]]:
    """Indices of ``tokens`` (images' token counts, in order) cut greedily into consecutive
    batches of at most ``max_tokens`` tokens and ``max_images`` images."""
    batches: list[list[int]] = []
    total = 0
    for index, count in enumerate(tokens):
        if (
            not batches
            or (max_tokens is not None and total + count > max_tokens)
            or (max_images is not None and len(batches[-1]) >= max_images)
        ):
            batches.append([])
            total = 0
        batches[-1].append(index)
        total += count
    return batches


def embed_crops(
    model: torch.nn.Module, pixels: torch.Tensor | list[torch.Tensor], pool: str
) -> torch.Tensor | list[torch.Tensor]:
    """uint8 crops ``(n, 3, S, S)`` (or a list of ``(3, H_i, W_i)`` images of their own
    sizes) to their pooled features, on the model's device (call under
    ``torch.inference_mode``)."""
    # transformers' plain Dinov2Config has no registers field.
    prefix_tokens = 1 + getattr(model.config, "num_register_tokens", 0)
    if isinstance(pixels, list):
        images = [normalize(p.to(model.device, non_blocking=True)) for p in pixels]
        output = model(pixel_values=[image.to(model.dtype) for image in images])
    else:
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
) -> Iterator[Batch]:
    """Per batch, from ``workers`` decoding processes (0: this one): the rows read, their uint8
    crops ``(n, 3, S, S)``, the rows that could not be read with the reason, and the
    seconds spent reading and decoding. With ``decode`` gpu, a batch with JPEGs holds a list
    of crops and ``DeviceJpeg``s instead, for ``gpu_decode.decoded_batches``."""
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
    batch_size: int | None,
    workers: int,
    times: StageTimes,
    crop: str = "center",
    max_tokens: int | None = None,
) -> Iterator[tuple[list[int], torch.Tensor | list[torch.Tensor] | None, list[tuple[int, str]]]]:
    """Per batch: the rows read (``crop="none"``: in an order of its own), their pooled
    features (on the model's device; the ``patch`` pool of uncropped images as a list of
    ``(h, w, D)`` grids), and the rows that could not be read with the reason. Batches hold
    at most ``batch_size`` images (None: ``DEFAULT_BATCH_SIZE``, or no cap under
    ``max_tokens``) and ``max_tokens`` tokens (``image_tokens``). ``times`` gathers the
    stages' seconds."""
    on_gpu = model.device.type == "cuda"
    # transformers' plain Dinov2Config has no registers field.
    prefix_tokens = 1 + getattr(model.config, "num_register_tokens", 0)
    patch = model.config.patch_size
    if batch_size is None and max_tokens is None:
        batch_size = DEFAULT_BATCH_SIZE
    if crop == "none":
        batches = _packed_batches(
            items,
            rows,
            crop_size=crop_size,
            decode=decode,
            uncropped=_Uncropped(patch, prefix_tokens, max_tokens),
            max_images=batch_size,
            workers=workers,
            pin_memory=on_gpu,
        )
    else:
        if max_tokens is not None:
            # Every crop takes the same tokens: the budget is a number of images.
            fit = max_tokens // image_tokens(crop_size, crop_size, patch, prefix_tokens)
            batch_size = fit if batch_size is None else min(batch_size, fit)
        batches = crop_batches(
            items,
            rows,
            crop_size=crop_size,
            decode=decode,
            batch_size=batch_size,
            workers=workers,
            pin_memory=on_gpu,
        )
        if decode == "gpu":
            batches = decoded_batches(batches, crop_size, model.device)
    with torch.inference_mode():
        for read_rows, pixels, failed, (read, decoded) in batches:
            times.read += read
            times.decode += decoded
            pooled = None
            if read_rows:
                started = time.perf_counter()
                pooled = embed_crops(model, pixels, pool)
                if crop == "none" and pool == "patch":
                    pooled = _grids(pooled, pixels, patch)
                if on_gpu:
                    torch.cuda.synchronize(model.device)  # so the model's time is its own
                times.model += time.perf_counter() - started
            times.images += len(read_rows) + len(failed)
            yield read_rows, pooled, failed
