"""Inputs that exhaust or confuse ``embed``, and the in-memory ``dinov2_fast.embed`` API.

FIFOs in folders, newlines in names, a folder called like a size, a full disk, a 1x20000
PNG; ``--decode fast`` and ``--verbose``; the worker default. In-process runs on a tiny model
and 28-pixel crops, so each costs little.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinov2_fast
from dinov2_fast._resolve import UserError
from tests._models import hf_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    hf_model().save_pretrained(folder)
    return folder


def _image(seed: int, height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str]:
    from dinov2_fast.cli import main

    status = main([str(a) for a in args])
    return status, capsys.readouterr().err


def _embed_args(model: Path, out: Path, *inputs: object) -> list[object]:
    return ["embed", *inputs, "--model", model, "--out", out, "--size", "28", "--device", "cpu"]


def test_a_fifo_in_a_folder_is_skipped_and_named(model_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    _image(0, 30, 40).save(folder / "a.png")
    os.mkfifo(folder / "b.png")  # reading it would wait for a writer forever
    out = tmp_path / "features.npy"

    def hung(signum, frame):
        raise TimeoutError("embed waited on the FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        status, err = _cli(capsys, *_embed_args(model_dir, out, folder), "--workers", "0")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert status == 0, err
    assert f"skipped {str(folder / 'b.png')!r}: not a regular file (a FIFO)" in err
    manifest = json.loads(out.with_suffix(".manifest.json").read_text())
    assert manifest["inputs"] == [str(folder / "a.png")]
    assert manifest["skipped"] == [
        {"path": str(folder / "b.png"), "reason": "not a regular file (a FIFO)"}
    ]


def test_a_newline_in_a_name_does_not_split_the_message(model_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    _image(0, 30, 40).save(folder / "a.png")
    (folder / "bad\nname.png").write_bytes(b"not an image")
    status, err = _cli(capsys, *_embed_args(model_dir, tmp_path / "f.npy", folder))
    assert status == 0, err
    skipped = [line for line in err.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and "bad\\nname.png" in skipped[0], err


@pytest.mark.parametrize("command", ["verify", "embed"])
def test_a_folder_named_like_a_size_is_not_taken_silently(
    model_dir, tmp_path, capsys, monkeypatch, command
):
    (tmp_path / "small").mkdir()
    monkeypatch.chdir(tmp_path)
    _image(0, 30, 40).save(tmp_path / "a.png")
    args = ["verify", "--model", "small", "--device", "cpu"]
    if command == "embed":
        args = ["embed", "a.png", "--model", "small", "--out", "f.npy", "--device", "cpu"]
    status, err = _cli(capsys, *args)
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and "ambiguous" in err and "./small" in err, err


def test_a_full_disk_names_the_file_being_written(model_dir, tmp_path, monkeypatch):
    from dinov2_fast.embedding import embed_images, sinks

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    image = tmp_path / "a.png"
    _image(0, 30, 40).save(image)
    out = tmp_path / "features.npy"
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(UserError, match=r"to write '.*features\.partial\.new/features\.npy'"):
        embed_images([str(image)], str(model_dir), out, device="cpu", workers=0)
    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(UserError, match=r"no space left .* to write '.*/run\.json'"):
        sinks.write_json(tmp_path / "run.json", {})


def test_an_extreme_aspect_ratio_needs_no_memory_beyond_the_crop(monkeypatch):
    from dinov2_fast.embedding.preprocess import crop_pixels, load_image

    png = io.BytesIO()
    _image(0, 20000, 1).save(png, format="PNG")
    resized = []
    resize = Image.Image.resize

    def guarded(image, size, *args, **kwargs):
        # Refuse instead of allocating: the full resize of this image is 1.3 gigapixels.
        if size[0] * size[1] > 4 * 256 * 256:
            raise MemoryError(f"resize to {size}")
        resized.append(size)
        return resize(image, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", guarded)
    for image in (load_image(io.BytesIO(png.getvalue())), _image(1, 1, 20000)):
        assert crop_pixels(image).shape == (3, 224, 224)


def test_fast_decode_downscales_jpegs_only_and_stays_close(tmp_path):
    from dinov2_fast.embedding.preprocess import crop_pixels, load_image

    smooth = np.linspace(0, 255, 1200)[None, :, None] * np.ones((900, 1, 3))
    image = Image.fromarray(smooth.astype(np.uint8))
    image.save(tmp_path / "a.jpg", quality=95)
    image.save(tmp_path / "a.png")
    exact = crop_pixels(load_image(tmp_path / "a.jpg")).astype(int)
    draft = load_image(tmp_path / "a.jpg", draft_size=256)
    assert draft.size == (600, 450)  # libjpeg scaled it by 1/2: still at least 256
    fast = crop_pixels(draft).astype(int)
    assert not np.array_equal(fast, exact) and np.abs(fast - exact).mean() < 2
    png = load_image(tmp_path / "a.png", draft_size=256)
    np.testing.assert_array_equal(crop_pixels(png), crop_pixels(load_image(tmp_path / "a.png")))


def test_embed_api_takes_every_kind_of_image_and_matches_the_cli(model_dir, tmp_path, capsys):
    images = [_image(seed, 30 + seed, 40) for seed in range(4)]
    paths = []
    for index, image in enumerate(images):
        paths.append(tmp_path / f"{index}.png")
        image.save(paths[-1])
    out = tmp_path / "features.npy"
    status, err = _cli(capsys, *_embed_args(model_dir, out, *paths), "--workers", "0")
    assert status == 0, err
    mixed = [
        images[0],
        np.asarray(images[1]),
        torch.from_numpy(np.array(images[2])).permute(2, 0, 1),
        str(paths[3]),
    ]
    features = dinov2_fast.embed(mixed, str(model_dir), crop_size=28, batch_size=3, device="cpu")
    assert features.shape == (4, 64) and features.dtype == torch.float32
    np.testing.assert_allclose(features.numpy(), np.load(out), rtol=1e-5, atol=1e-6)
    # A loaded model, transformers' own, is used as it is.
    reference = dinov2_fast.embed(images, hf_model(), crop_size=28, pool="cls+mean")
    assert reference.shape == (4, 128)
    with pytest.raises(TypeError, match="not one image"):
        dinov2_fast.embed(str(paths[0]), str(model_dir))
    with pytest.raises(ValueError, match=r"image 0 \(ndarray\) cannot be read: .*uint8"):
        dinov2_fast.embed([np.zeros((30, 40, 3))], str(model_dir), crop_size=28)
    with pytest.raises(ValueError, match=r"image 0 \('.*missing.png'\) cannot be read"):
        dinov2_fast.embed([tmp_path / "missing.png"], str(model_dir), crop_size=28)


def test_verbose_reports_the_stages_and_decode_gpu_says_what_it_needs(model_dir, tmp_path, capsys):
    image = tmp_path / "a.png"
    _image(0, 30, 40).save(image)
    args = _embed_args(model_dir, tmp_path / "f.npy", image)
    status, err = _cli(capsys, *args, "--workers", "0", "--verbose")
    assert status == 0, err
    assert "time: read" in err and "decode+resize" in err and "model" in err, err
    status, err = _cli(capsys, *args, "--overwrite", "--decode", "gpu")
    assert status == 2 and "--decode gpu" in err and "torchvision" in err, err


@pytest.mark.parametrize(
    ("cores", "local_processes", "device", "workers"),
    [
        (2, 1, "cpu", 1),
        (16, 1, "cpu", 8),
        (32, 1, "cuda", 16),
        (32, 4, "cuda", 7),
        (1, 1, "cuda", 1),
    ],
)
def test_default_workers_follow_the_cores(monkeypatch, cores, local_processes, device, workers):
    from dinov2_fast.embedding.runner import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_processes))
    assert default_workers(torch.device(device)) == workers
