"""``--decode gpu``: the device half run on the CPU with Pillow standing in for nvjpeg (row
order, shapes, the exact path for PNGs, CMYK and refused JPEGs, unreadable files named, EXIF
orientation, the resize's distance from exact), the one-line errors where it cannot run, and,
on a GPU with torchvision, the real nvjpeg path against its documented bound."""

from __future__ import annotations

import io
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import dinov2_fast
from dinov2_fast._resolve import UserError
from dinov2_fast.embedding import gpu_decode
from dinov2_fast.embedding.engine import crop_batches
from dinov2_fast.embedding.preprocess import check_decode, crop_pixels, load_image, normalize
from dinov2_fast.embedding.sources import read_input
from tests._models import hf_model

_CROP = 56


def _photo(seed: int, height: int, width: int) -> Image.Image:
    """Smooth colour fields with noise, as JPEG codes photos."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    fields = [128 + 100 * np.sin(4 * x + c + seed) * np.cos(3 * y - c) for c in range(3)]
    pixels = np.stack(fields, -1) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _exact(path: Path, crop_size: int = _CROP) -> np.ndarray:
    return crop_pixels(load_image(io.BytesIO(read_input(path))), crop_size)


@pytest.fixture()
def inputs(tmp_path: Path) -> list[Path]:
    """JPEG, PNG, EXIF-rotated JPEG, not an image, greyscale, cut-off JPEG, CMYK JPEG,
    progressive JPEG (which the stand-in decoder refuses), a JPEG member of a tar shard."""
    paths = [tmp_path / name for name in ("a.jpg", "b.png", "c.jpg", "d.jpg")]
    paths += [tmp_path / name for name in ("e.jpg", "f.jpg", "g.jpg", "h.jpg")]
    _photo(0, 90, 120).save(paths[0], quality=90)
    _photo(1, 70, 100).save(paths[1])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    _photo(2, 80, 140).save(paths[2], quality=90, exif=exif)
    paths[3].write_bytes(b"not a jpeg")
    _photo(4, 100, 100).convert("L").save(paths[4], quality=90)
    whole = io.BytesIO()
    _photo(5, 120, 90).save(whole, format="JPEG", quality=90)
    paths[5].write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    _photo(6, 64, 96).convert("CMYK").save(paths[6], quality=90)
    _photo(7, 96, 64).save(paths[7], quality=90, progressive=True)
    _photo(8, 72, 72).save(tmp_path / "i.jpg", quality=90)
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        tar.add(tmp_path / "i.jpg", arcname="i.jpg")
    return [*paths, tmp_path / "shard.tar::i.jpg"]


class _StandIn:
    """Pillow's decode in nvjpeg's place, refusing progressive JPEGs as a whole batch (as
    nvjpeg returns no partial results), and remembering what it was given."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def __call__(self, encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        datas = [data.numpy().tobytes() for data in encoded]
        self.seen += datas
        for data in datas:
            with Image.open(io.BytesIO(data)) as image:
                if image.info.get("progressive"):
                    raise RuntimeError("unsupported JPEG: progressive")
        return gpu_decode.pillow_decode(encoded, device)


def _run(paths: list[Path], decode, workers: int = 0, batch_size: int = 3):
    batches = crop_batches(
        [str(p) for p in paths],
        np.arange(len(paths)),
        crop_size=_CROP,
        decode="gpu",
        batch_size=batch_size,
        workers=workers,
    )
    rows, crops, failed = [], [], []
    for read, pixels, unreadable, _ in gpu_decode.decoded_batches(
        batches, _CROP, torch.device("cpu"), decode=decode
    ):
        rows += read
        failed += unreadable
        if pixels is not None:
            assert pixels.dtype == torch.uint8 and pixels.shape == (len(read), 3, _CROP, _CROP)
            crops += list(pixels.numpy())
    return rows, crops, dict(failed)


def test_gpu_batches_keep_row_order_and_fall_back_to_exact(inputs):
    stand_in = _StandIn()
    # One decoding process: the undecoded JPEGs cross a process boundary as they do in a run.
    rows, crops, failed = _run(inputs, stand_in, workers=1)
    assert rows == [0, 1, 2, 4, 6, 7, 8]
    assert sorted(failed) == [3, 5]
    assert failed[3].startswith("cannot identify the image format")
    assert "truncated" in failed[5]
    by_row = dict(zip(rows, crops, strict=True))
    # Through the device half: within a level of exact, EXIF rotation included.
    for row in (0, 2, 4, 8):
        difference = np.abs(by_row[row].astype(int) - _exact(inputs[row]))
        assert difference.max() <= 1, row
    # PNG, CMYK and the refused progressive JPEG took the exact path: exact to the bit.
    for row in (1, 6, 7):
        np.testing.assert_array_equal(by_row[row], _exact(inputs[row]))
    # Only JPEGs went to the decoder; the progressive one made it retry one at a time.
    jpegs = {read_input(inputs[i]) for i in (0, 2, 4, 5, 7, 8)}
    assert set(stand_in.seen) == jpegs and len(stand_in.seen) > len(jpegs)


def test_exif_orientations_are_turned_as_pillow_turns_them():
    pixels = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3)
    for orientation in range(1, 9):
        image = Image.fromarray(pixels)
        image.getexif()[0x0112] = orientation
        expected = np.asarray(ImageOps.exif_transpose(image)).transpose(2, 0, 1)
        turned = gpu_decode._upright(torch.from_numpy(pixels).permute(2, 0, 1), orientation)
        np.testing.assert_array_equal(turned.numpy(), expected, err_msg=str(orientation))


@pytest.mark.parametrize("crop_size", [224, 28])
def test_device_resize_is_within_a_level_of_pillows(crop_size):
    # Uniform noise is the worst case: a single 2-D pass is 22 levels off when enlarging.
    rng = np.random.default_rng(0)
    for height, width in [(60, 80), (200, 300), (480, 640), (700, 500)]:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        exact = crop_pixels(Image.fromarray(pixels), crop_size).astype(int)
        ours = gpu_decode.resize_crop(torch.from_numpy(pixels).permute(2, 0, 1), crop_size)
        assert ours.shape == (3, crop_size, crop_size)
        assert np.abs(ours.numpy() - exact).max() <= 1, (height, width)


def _fake_torchvision(monkeypatch, version: str, cuda: str | None, io_module=True) -> None:
    module = types.ModuleType("torchvision")
    module.__version__ = version
    module.version = types.SimpleNamespace(cuda=cuda)
    monkeypatch.setitem(sys.modules, "torchvision", module)
    monkeypatch.setitem(
        sys.modules, "torchvision.io", types.ModuleType("io") if io_module else None
    )


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("device cpu", "--device cpu puts the model on the CPU"),
        ("no cuda", "no CUDA device is available"),
        ("no torchvision", r"which is not installed: pip install torchvision \(the release"),
        ("broken torchvision", "torchvision, which does not import"),
        ("cpu torchvision", "torchvision 0.20.1 is built without CUDA"),
        ("old torchvision", "0.19 or later .* got 0.18.1"),
    ],
)
def test_decode_gpu_says_which_requirement_is_missing(monkeypatch, setup, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: setup != "no cuda")
    if setup == "no torchvision":
        monkeypatch.setitem(sys.modules, "torchvision", None)
    elif setup == "broken torchvision":
        _fake_torchvision(monkeypatch, "0.20.1", "12.4", io_module=False)
    elif setup == "cpu torchvision":
        _fake_torchvision(monkeypatch, "0.20.1", None)
    elif setup == "old torchvision":
        _fake_torchvision(monkeypatch, "0.18.1", "12.1")
    with pytest.raises(UserError, match=expected) as raised:
        check_decode("gpu", "cpu" if setup == "device cpu" else "auto")
    assert "\n" not in str(raised.value) and "--decode exact or fast" in str(raised.value)


def test_decode_gpu_is_refused_before_any_work(monkeypatch, tmp_path, capsys):
    from dinov2_fast.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "f.npy"
    # The model does not exist: the decode's refusal comes first.
    status = main(
        ["embed", str(tmp_path), "--model", "missing", "--out", str(out), "--decode", "gpu"]
    )
    assert status == 2 and "no CUDA device" in capsys.readouterr().err
    assert not out.exists() and not out.with_suffix(".partial").exists()
    with pytest.raises(ValueError, match="--decode gpu .* on the CPU"):
        dinov2_fast.embed([_photo(0, 30, 30)], hf_model(), decode="gpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvjpeg_path_stays_within_the_documented_bound(tmp_path):
    pytest.importorskip("torchvision")
    check_decode("gpu", "cuda")
    paths = []
    for seed, (height, width) in enumerate([(480, 640), (640, 480), (1200, 1600)]):
        paths.append(tmp_path / f"{seed}.jpg")
        _photo(seed, height, width).save(paths[-1], quality=90)
    exif = Image.Exif()
    exif[0x0112] = 8
    paths.append(tmp_path / "rotated.jpg")
    _photo(3, 300, 500).save(paths[-1], quality=90, exif=exif)
    paths.append(tmp_path / "grey.jpg")
    _photo(4, 400, 300).convert("L").save(paths[-1], quality=90)
    batches = crop_batches(
        [str(p) for p in paths],
        np.arange(len(paths)),
        crop_size=224,
        decode="gpu",
        batch_size=len(paths),
        workers=0,
    )
    device = torch.device("cuda")
    ((rows, pixels, failed, _),) = gpu_decode.decoded_batches(batches, 224, device)
    assert rows == list(range(len(paths))) and not failed and pixels.device.type == "cuda"
    exact = torch.stack([torch.from_numpy(crop_pixels(load_image(p))) for p in paths])
    difference = (pixels.cpu().int() - exact.int()).abs().float()
    # docs/cli.md: a mean difference of at most 2 levels per image, 1 - cosine at most 1e-3.
    assert difference.mean(dim=(1, 2, 3)).max() <= 2, difference.mean(dim=(1, 2, 3))
    model = hf_model(image_size=224).to(device)
    with torch.inference_mode():
        ours = model(pixel_values=normalize(pixels)).pooler_output
        theirs = model(pixel_values=normalize(exact.to(device))).pooler_output
    cosine = torch.nn.functional.cosine_similarity(ours, theirs)
    assert (1 - cosine).max() <= 1e-3, cosine


def test_gpu_decode_with_uncropped_images_is_refused():
    from dinov2_fast._resolve import UserError
    from dinov2_fast.embedding.preprocess import check_crop

    check_crop("none", "fast")
    with pytest.raises(UserError, match="--decode gpu makes centre crops only"):
        check_crop("none", "gpu")
