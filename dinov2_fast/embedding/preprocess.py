"""The DINOv2 checkpoints' image pipeline, pixel for pixel, in two halves.

Matches transformers' ``BitImageProcessor`` (PIL backend) as configured by the
``facebook/dinov2-*`` checkpoints: RGB conversion, shortest edge resized with PIL bicubic,
center crop, rescale by 1/255, ImageNet mean/std. Files are opened as transformers'
``load_image`` (and so its image-feature-extraction pipeline) opens them: EXIF orientation
applied.

``crop_pixels`` does the first half on the CPU and returns the uint8 crop, bit for bit the
crop transformers rescales (``resize_pixels``, for ``--crop none``, the whole resized image,
as ``BitImageProcessor(do_center_crop=False)`` gives it, less the last rows and columns past
a patch multiple, which the model's patch embedding drops anyway); ``normalize`` does the
rescale and normalisation wherever the batch is (the GPU, for a run on one), so only a quarter
of the bytes cross from the decoding processes and the float work leaves the CPU.

The resize computes only the pixels the crop keeps when the full resize would be much larger
than the crop and than the image (a small side enlarged at an extreme aspect ratio: a 1x20000
image resized to a shortest edge of 256 is 1.3 gigapixels), with PIL's own fixed-point
arithmetic, so memory per image stays bounded by the crop and the pixels stay PIL's. A
shrinking resize never outgrows the decoded image, and PIL's full resize serves it.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image, ImageOps

from .._resolve import CROPS, DECODES, UserError

__all__ = [
    "check_crop",
    "check_decode",
    "crop_pixels",
    "load_image",
    "normalize",
    "resize_pixels",
    "resize_size_for",
    "uncropped_shape",
]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PIL's resampling arithmetic (libImaging/Resample.c): coefficients in 22-bit fixed point,
# bicubic with a = -0.5 and support 2.
_PRECISION_BITS = 32 - 8 - 2
_BICUBIC_SUPPORT = 2.0
_BICUBIC_A = -0.5
# A full PIL resize is used up to this many times the pixels of the resized square; beyond
# it only the pixels that survive the crop are computed.
_FULL_RESIZE_LIMIT = 4
# Integers gathered at once by the windowed resize (8 bytes each).
_CHUNK_ELEMENTS = 1 << 22


def check_decode(decode: str, device: str = "auto") -> None:
    """Refuse a decode mode this installation cannot run on ``device`` (the ``--device``
    choice or the model's device type), saying what would."""
    if decode not in DECODES:
        raise UserError(f"--decode must be one of {', '.join(DECODES)}, got {decode!r}")
    if decode == "gpu":
        from .gpu_decode import check_gpu_decode  # here: gpu_decode imports this module

        check_gpu_decode(device)


def check_crop(crop: str, decode: str = "exact") -> None:
    """Refuse an unknown crop, or one the decode mode cannot produce."""
    if crop not in CROPS:
        raise UserError(f"--crop must be one of {', '.join(CROPS)}, got {crop!r}")
    if crop == "none" and decode == "gpu":
        raise UserError(
            "--decode gpu makes centre crops only: use --crop center with it, or --decode "
            "exact or fast with --crop none"
        )


def resize_size_for(crop_size: int) -> int:
    """Shortest-edge resize that goes with a crop: 256 for 224, the checkpoints' ratio otherwise."""
    return round(crop_size * 256 / 224)


def load_image(path: str | os.PathLike, *, draft_size: int | None = None) -> Image.Image:
    """Open and fully decode an image, turned upright by its EXIF orientation as transformers'
    ``load_image`` turns it; raises on unreadable or truncated files. ``crop_pixels``
    converts it to RGB.

    ``draft_size`` (``--decode fast``): a JPEG is decoded at the smallest libjpeg scale that
    keeps both sides at least this long; other formats as usual.
    """
    with Image.open(path) as image:
        if draft_size is not None:
            image.draft(image.mode, (draft_size, draft_size))
        image.load()
        # In place: without an orientation to apply, a copy would only cost time.
        ImageOps.exif_transpose(image, in_place=True)
        return image


def _resized_shape(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    # The long edge is truncated, not rounded, as in transformers' get_resize_output_image_size.
    if width <= height:
        return int(shortest_edge * height / width), shortest_edge
    return shortest_edge, int(shortest_edge * width / height)


def _windowed(height: int, width: int, shortest_edge: int) -> bool:
    """Whether only the crop's pixels of the resize are computed: a small side enlarged
    to a full resize much larger than the crop and the image."""
    resized_height, resized_width = _resized_shape(height, width, shortest_edge)
    limit = _FULL_RESIZE_LIMIT * shortest_edge * shortest_edge
    return min(height, width) < shortest_edge and resized_height * resized_width > limit


def _bicubic(x: np.ndarray) -> np.ndarray:
    """PIL's bicubic_filter, operation for operation (the float64 results must be its own)."""
    x = np.abs(x)
    a = _BICUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _coefficients(
    in_size: int, out_size: int, first: int, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PIL's precompute_coeffs and normalize_coeffs_8bpc for outputs ``first..first+count``
    of a full-image resize: each output's first input, its number of inputs, and their
    fixed-point weights (zero past that number)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _BICUBIC_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(first, first + count) + 0.5) * scale
    # C's (int) truncates toward zero.
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xcount = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    offsets = (taps[None, :] + xmin[:, None]) - center[:, None] + 0.5
    weights = np.where(taps[None, :] < xcount[:, None], _bicubic(offsets * (1.0 / filterscale)), 0)
    total = np.zeros(count)
    for tap in range(ksize):  # summed in C's order: the rounding of the total is PIL's
        total += weights[:, tap]
    weights = np.divide(weights, total[:, None], out=weights, where=total[:, None] != 0)
    fixed = weights * (1 << _PRECISION_BITS)
    fixed = np.trunc(np.where(fixed < 0, fixed - 0.5, fixed + 0.5)).astype(np.int64)
    return xmin, xcount, fixed


def _resample_columns(pixels: np.ndarray, xmin: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """PIL's 8-bit horizontal pass over ``pixels`` (rows, columns, 3) for the given outputs."""
    taps = fixed.shape[1]
    index = np.minimum(xmin[:, None] + np.arange(taps), pixels.shape[1] - 1)
    out = np.empty((pixels.shape[0], len(xmin), 3), dtype=np.uint8)
    step = max(1, _CHUNK_ELEMENTS // (len(xmin) * taps * 3))
    for start in range(0, pixels.shape[0], step):
        gathered = pixels[start : start + step][:, index].astype(np.int64)
        acc = np.einsum("rotc,ot->roc", gathered, fixed) + (1 << (_PRECISION_BITS - 1))
        out[start : start + step] = np.clip(acc >> _PRECISION_BITS, 0, 255)
    return out


def _resize_crop_window(
    image: Image.Image, height: int, width: int, top: int, left: int, crop_size: int
) -> np.ndarray:
    """The crop of an enlarging bicubic resize, computing only its pixels: PIL's horizontal
    pass on the rows the crop needs, then its vertical pass (PIL's order when it enlarges;
    when it shrinks, this Pillow may take the vertical pass first), in its fixed-point
    arithmetic."""
    pixels = np.asarray(image)
    resize_rows = height != image.height
    if resize_rows:
        ymin, ycount, yfixed = _coefficients(image.height, height, top, crop_size)
        first, last = int(ymin.min()), int((ymin + ycount).max())
    else:
        first, last = top, top + crop_size
    pixels = pixels[first:last]
    if width != image.width:
        xmin, _, xfixed = _coefficients(image.width, width, left, crop_size)
        pixels = _resample_columns(pixels, xmin, xfixed)
    else:
        pixels = pixels[:, left : left + crop_size]
    if resize_rows:
        pixels = _resample_columns(pixels.transpose(1, 0, 2), ymin - first, yfixed)
        pixels = pixels.transpose(1, 0, 2)
    return pixels


def crop_pixels(image: Image.Image, crop_size: int = 224) -> np.ndarray:
    """A PIL image to its ``(3, crop_size, crop_size)`` uint8 crop, as transformers crops it.

    The one RGB conversion of the pipeline happens here: alpha dropped, grey replicated,
    16-bit values clipped to 255, as transformers converts them.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    resize = resize_size_for(crop_size)
    height, width = _resized_shape(image.height, image.width, resize)
    # The resize is never smaller than the crop, so the crop needs no padding.
    top = (height - crop_size) // 2
    left = (width - crop_size) // 2
    if _windowed(image.height, image.width, resize):
        pixels = _resize_crop_window(image, height, width, top, left, crop_size)
    else:
        resized = np.asarray(image.resize((width, height), resample=Image.Resampling.BICUBIC))
        pixels = resized[top : top + crop_size, left : left + crop_size]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def uncropped_shape(height: int, width: int, size: int, patch_size: int) -> tuple[int, int]:
    """The ``--crop none`` pixels of a ``height`` x ``width`` image: the shortest edge
    resized to ``size`` (at least one patch), each side floored to a multiple of the patch."""
    height, width = _resized_shape(height, width, size)
    return height // patch_size * patch_size, width // patch_size * patch_size


def resize_pixels(image: Image.Image, size: int, patch_size: int) -> np.ndarray:
    """A PIL image to its ``(3, H, W)`` uint8 ``--crop none`` pixels (``uncropped_shape``):
    transformers' resize to a shortest edge of ``size``, uncropped, then its top-left
    ``H`` x ``W``, the pixels the model's patches cover."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    height, width = _resized_shape(image.height, image.width, size)
    keep_height, keep_width = uncropped_shape(image.height, image.width, size, patch_size)
    resized = np.asarray(image.resize((width, height), resample=Image.Resampling.BICUBIC))
    return np.ascontiguousarray(resized[:keep_height, :keep_width].transpose(2, 0, 1))


_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 crops ``(..., 3, S, S)`` to the model's float32 input, on their own device.

    ``x / 255`` in float32 equals transformers' float64 ``x * (1/255)`` cast to float32 for
    every uint8 value, and the mean and std steps are its float32 ones, so the result is
    transformers' to the last bit on the CPU (and within float32 rounding on a GPU).
    """
    scaled = pixels.to(torch.float32) / 255
    return (scaled - _MEAN.to(pixels.device)) / _STD.to(pixels.device)
