"""``--decode gpu``: JPEGs decoded by nvjpeg (torchvision) and resized on the model's device.

A different pipeline from ``exact``, in two halves like it. In the decoding processes,
``device_jpeg`` reads only a file's header: an RGB or greyscale JPEG crosses to the main
process as its bytes with its EXIF orientation; anything else (PNG, CMYK JPEGs, images whose
resize would be huge) takes the exact CPU path there. In the main process,
``decoded_batches`` decodes a batch's JPEGs together on the device, turns them upright,
resizes the shortest edge with torch's antialiased bicubic in float32 (``resize_crop``,
rounded back to uint8, so normalisation and the model are shared with ``exact``) and crops
the centre. A JPEG the decoder refuses is decoded alone, and failing that takes the exact
CPU path; one that path cannot read either is skipped with its reason, as in ``exact``.

The torchvision import is lazy, and the device half takes the decode function as a parameter
(``nvjpeg_decode`` by default), so it runs on the CPU with another decoder standing in.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .._resolve import UserError, first_line
from .preprocess import _resized_shape, _windowed, crop_pixels, load_image, resize_size_for

__all__ = [
    "Batch",
    "Decoder",
    "DeviceJpeg",
    "check_gpu_decode",
    "decoded_batches",
    "device_crops",
    "device_jpeg",
    "nvjpeg_decode",
    "pillow_decode",
    "resize_crop",
]

# Encoded images (1-D uint8 CPU tensors) to decoded (3, H, W) uint8 tensors on the device.
Decoder = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]

_ORIENTATION_TAG = 0x0112
# JPEG modes that decode to RGB without a colour conversion nvjpeg might do differently
# (CMYK and YCCK JPEGs take the exact path).
_DEVICE_MODES = ("RGB", "L")
# The first torchvision whose decode_jpeg takes a list and decodes it as one nvjpeg batch.
_BATCHED_TORCHVISION = (0, 19)


class DeviceJpeg(NamedTuple):
    """A JPEG left for the device to decode: its bytes and its EXIF orientation (1-8)."""

    data: torch.Tensor
    orientation: int


def check_gpu_decode(device: str) -> None:
    """Refuse ``--decode gpu`` where it cannot run, saying which requirement is missing.

    ``device`` is the ``--device`` choice (``auto``, ``cpu``, ``cuda``, ``cuda:N``) or the
    loaded model's device type. Checked before any work; nothing is loaded onto a GPU.
    """
    fallback = "use --decode exact or fast"
    if device == "cpu":
        raise UserError(
            "--decode gpu decodes JPEGs with torchvision's nvjpeg on the model's CUDA device, "
            f"and --device cpu puts the model on the CPU: use --device cuda or auto, or {fallback}"
        )
    if not torch.cuda.is_available():
        raise UserError(
            "--decode gpu decodes JPEGs with torchvision's nvjpeg on a CUDA device, and no CUDA "
            f"device is available (see `dinov2-fast info`): {fallback}"
        )
    wanted = f"torchvision (the release built for torch {torch.__version__})"
    try:
        import torchvision
        import torchvision.io  # noqa: F401
    # A torchvision built for another torch fails in many ways, not only with ImportError.
    except Exception as err:
        if isinstance(err, ModuleNotFoundError) and err.name == "torchvision":
            raise UserError(
                f"--decode gpu decodes JPEGs with nvjpeg through torchvision, which is not "
                f"installed: pip install {wanted}, or {fallback}"
            ) from None
        raise UserError(
            f"--decode gpu needs torchvision, which does not import ({first_line(err)}): "
            f"install {wanted}, or {fallback}"
        ) from None
    if torchvision.version.cuda is None:
        raise UserError(
            f"--decode gpu needs torchvision's nvjpeg decode, and torchvision "
            f"{torchvision.__version__} is built without CUDA: install {wanted}, "
            f"or {fallback}"
        )
    release = tuple(int(part) for part in torchvision.__version__.split(".")[:2])
    if release < _BATCHED_TORCHVISION:
        raise UserError(
            f"--decode gpu needs torchvision 0.19 or later (batched nvjpeg decode), got "
            f"{torchvision.__version__}: install {wanted}, or {fallback}"
        )


def nvjpeg_decode(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's batched nvjpeg decode to RGB on ``device``.

    No EXIF orientation here: torchvision applies it on the CPU only (``decode_jpeg``'s docs),
    so ``device_crops`` applies the orientation read in the decoding process.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


def pillow_decode(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Pillow's decode to RGB in ``nvjpeg_decode``'s shape, EXIF orientation not applied
    either: the stand-in that measures the device half on the CPU (bench/input_pipeline.py,
    the tests)."""
    decoded = []
    for data in encoded:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            pixels = np.array(image.convert("RGB"))
        decoded.append(torch.from_numpy(pixels).permute(2, 0, 1).to(device))
    return decoded


def device_jpeg(data: bytes, crop_size: int) -> DeviceJpeg | None:
    """A file's bytes as a JPEG for the device, or None where the exact path should decode
    it. Reads only the header; raises as Pillow does on a file it cannot identify."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format != "JPEG" or image.mode not in _DEVICE_MODES:
            return None
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
        width, height = image.size
    if orientation in (5, 6, 7, 8):  # turned by a quarter: the upright image's sides swap
        width, height = height, width
    if _windowed(height, width, resize_size_for(crop_size)):
        return None  # the exact path computes only the crop's pixels of such a resize
    return DeviceJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation)


def _upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) image turned as Pillow's ``exif_transpose`` turns it for each orientation."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.rot90(-1, (-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return image.rot90(1, (-2, -1))
    return image


def resize_crop(image: torch.Tensor, crop_size: int) -> torch.Tensor:
    """A (3, H, W) uint8 image to its (3, S, S) uint8 crop, on its own device: the shortest
    edge resized as in ``exact``, by torch's antialiased bicubic in float32, then the same
    centre crop.

    As Pillow does, the width is resized first, then the height, each pass rounded and
    clipped to uint8: one 2-D pass instead differs by up to 22 levels from Pillow where a
    small, detailed image is enlarged (Pillow's first pass clips its overshoot); two differ
    by at most 1.
    """
    height, width = _resized_shape(image.shape[-2], image.shape[-1], resize_size_for(crop_size))
    pixels = image[None].float()
    for size in ((image.shape[-2], width), (height, width)):
        if size != pixels.shape[-2:]:
            pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True)
            pixels = pixels.round().clamp(0, 255)
    top, left = (height - crop_size) // 2, (width - crop_size) // 2
    return pixels[0, :, top : top + crop_size, left : left + crop_size].to(torch.uint8)


def _exact_crop(jpeg: DeviceJpeg, crop_size: int, device: torch.device) -> torch.Tensor | str:
    """The exact CPU path for a JPEG the decoder refused, or why it cannot be read."""
    try:
        image = load_image(io.BytesIO(jpeg.data.numpy().tobytes()))
        return torch.from_numpy(crop_pixels(image, crop_size)).to(device)
    # As in the decoding processes: whatever a damaged file raises means "skip it".
    except Exception as err:
        return first_line(err)


def device_crops(
    jpegs: Sequence[DeviceJpeg], crop_size: int, device: torch.device, decode: Decoder
) -> list[torch.Tensor | str]:
    """Each JPEG's (3, S, S) uint8 crop on ``device``, in order, or why it cannot be read.

    The batch is decoded at once; if ``decode`` refuses it (it returns no partial results),
    each JPEG alone, and one it refuses then takes the exact CPU path.
    """
    encoded = [jpeg.data for jpeg in jpegs]
    try:
        decoded: list[torch.Tensor | None] = list(decode(encoded, device))
    except Exception:
        decoded = []
        for data in encoded:
            try:
                decoded.append(decode([data], device)[0])
            except Exception:
                decoded.append(None)
    return [
        _exact_crop(jpeg, crop_size, device)
        if image is None
        else resize_crop(_upright(image, jpeg.orientation), crop_size)
        for jpeg, image in zip(jpegs, decoded, strict=True)
    ]


Batch = tuple[list[int], torch.Tensor | list | None, list[tuple[int, str]], tuple[float, float]]


def _decode_batch(
    rows: list[int], pixels: list, crop_size: int, device: torch.device, decode: Decoder
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """A batch's crops and JPEGs to the rows read, their crops on ``device``, and the rows
    that could not be read with the reason."""
    jpegs = [index for index, item in enumerate(pixels) if isinstance(item, DeviceJpeg)]
    crops = device_crops([pixels[index] for index in jpegs], crop_size, device, decode)
    items = dict(enumerate(pixels)) | dict(zip(jpegs, crops, strict=True))
    failed = [(rows[index], item) for index, item in items.items() if isinstance(item, str)]
    kept = [index for index, item in items.items() if isinstance(item, torch.Tensor)]
    if not kept:
        return [], None, failed
    batch = torch.stack([items[index].to(device, non_blocking=True) for index in kept])
    return [rows[index] for index in kept], batch, failed


def decoded_batches(
    batches: Iterator[Batch],
    crop_size: int,
    device: torch.device,
    decode: Decoder = nvjpeg_decode,
) -> Iterator[Batch]:
    """``engine.crop_batches``' batches of ``--decode gpu``, with their JPEGs decoded on
    ``device`` and every crop there: the rows read, in order, their crops ``(n, 3, S, S)``,
    the rows that could not be read with the reason, and the seconds (the device decode
    counted with the decoding processes' decode)."""
    for rows, pixels, failed, (read, decoded) in batches:
        if isinstance(pixels, list):  # some rows are JPEGs left to decode here
            started = time.perf_counter()
            rows, pixels, unreadable = _decode_batch(rows, pixels, crop_size, device, decode)
            failed = failed + unreadable
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # so the decode's time is its own
            decoded += time.perf_counter() - started
        yield rows, pixels, failed, (read, decoded)
