"""The DINOv2 checkpoints' image pipeline, pixel for pixel.

Matches transformers' ``BitImageProcessor`` (PIL backend) as configured by the
``facebook/dinov2-*`` checkpoints: RGB conversion, shortest edge resized with PIL bicubic,
center crop, rescale by 1/255, ImageNet mean/std. Files are opened as transformers'
``load_image`` (and so its image-feature-extraction pipeline) opens them: EXIF orientation
applied.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

__all__ = ["load_image", "preprocess", "resize_size_for"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
_STD = np.array(IMAGENET_STD, dtype=np.float32)
# transformers stores 1/255 as this Python float and rescales in float64 before casting.
_RESCALE = 1 / 255


def resize_size_for(crop_size: int) -> int:
    """Shortest-edge resize that goes with a crop: 256 for 224, the checkpoints' ratio otherwise."""
    return round(crop_size * 256 / 224)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image, turned upright by its EXIF orientation as transformers'
    ``load_image`` turns it; raises on unreadable or truncated files. ``preprocess`` converts
    it to RGB."""
    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image)


def _resized_shape(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    # The long edge is truncated, not rounded, as in transformers' get_resize_output_image_size.
    if width <= height:
        return int(shortest_edge * height / width), shortest_edge
    return shortest_edge, int(shortest_edge * width / height)


def preprocess(image: Image.Image, crop_size: int = 224) -> np.ndarray:
    """A PIL image to normalized ``(3, crop_size, crop_size)`` float32 pixels.

    The one RGB conversion of the pipeline happens here: alpha dropped, grey replicated,
    16-bit values clipped to 255, as transformers converts them.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    height, width = _resized_shape(image.height, image.width, resize_size_for(crop_size))
    pixels = np.asarray(image.resize((width, height), resample=Image.Resampling.BICUBIC))
    # The resize is never smaller than the crop, so the crop needs no padding.
    top = (height - crop_size) // 2
    left = (width - crop_size) // 2
    pixels = pixels[top : top + crop_size, left : left + crop_size]
    scaled = (pixels.astype(np.float64) * _RESCALE).astype(np.float32)
    return ((scaled - _MEAN) / _STD).transpose(2, 0, 1)
