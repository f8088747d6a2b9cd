"""Run integrity of ``embed``: no resume across changed weights, one run per ``--out``, no
rows dropped by a shorter resume, damaged run files as one-line errors that ``--overwrite``
always gets past. In-process runs on a tiny model and 28-pixel crops, so each costs little."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinov2_fast._resolve import UserError
from tests._embedding import embed_small
from tests._models import hf_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    hf_model().save_pretrained(folder)
    return folder


@pytest.fixture()
def images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for index, (height, width) in enumerate([(40, 30), (32, 48), (36, 36)]):
        path = tmp_path / f"img{index}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _cli(capsys: pytest.CaptureFixture, model: Path, out: Path, inputs: list[Path], *extra):
    from dinov2_fast.cli import main

    args = ["embed", *map(str, inputs), "--model", str(model), "--out", str(out)]
    status = main([*args, "--size", "28", "--device", "cpu", "--workers", "0", *extra])
    return status, capsys.readouterr().err


def test_resume_refuses_weights_that_changed_in_place(model_dir, images, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    out = tmp_path / "features.npy"
    embed_small(model, out, images[:2])
    # Same size and mtime, other values: only the content can tell.
    weights = model / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(UserError, match="weights of .* changed"):
        embed_small(model, out, images, resume=True)
    assert embed_small(model, out, images, overwrite=True).rows == 3


def test_resume_with_the_same_weights_keeps_the_rows(model_dir, images, tmp_path):
    out = tmp_path / "features.npy"
    embed_small(model_dir, out, images[:2])
    first = np.load(out)
    assert embed_small(model_dir, out, images, resume=True).rows == 3
    np.testing.assert_array_equal(np.load(out)[:2], first)
    assert json.loads(out.with_suffix(".manifest.json").read_text())["model_fingerprint"]


def test_a_second_run_on_the_same_out_is_refused_naming_the_first(model_dir, images, tmp_path):
    from dinov2_fast.embedding.lock import RunLock

    out = tmp_path / "features.npy"
    running = RunLock(out)
    running.acquire()
    try:
        with pytest.raises(UserError, match=f"another embed is writing .*process {os.getpid()}"):
            embed_small(model_dir, out, images)
        with pytest.raises(UserError, match="another embed is writing"):
            embed_small(model_dir, out, images, overwrite=True)
    finally:
        running.release()
    assert not out.exists()
    assert embed_small(model_dir, out, images).rows == 3
    assert not out.with_suffix(".lock").exists()


def test_a_stale_lock_of_a_dead_run_is_taken_over(model_dir, images, tmp_path, capsys):
    out = tmp_path / "features.npy"
    # What a killed run leaves: the file naming it, with no flock held on it.
    holder = {"pid": 999999, "host": "elsewhere", "started": "yesterday"}
    out.with_suffix(".lock").write_text(json.dumps(holder))
    assert embed_small(model_dir, out, images).rows == 3
    assert "taking over the lock" in capsys.readouterr().err
    assert not out.with_suffix(".lock").exists()


def test_resume_with_fewer_inputs_is_refused_and_keeps_the_output(
    model_dir, images, tmp_path, capsys
):
    out = tmp_path / "features.npy"
    embed_small(model_dir, out, images)
    before = {p: p.read_bytes() for p in (out, out.with_suffix(".manifest.json"))}
    status, err = _cli(capsys, model_dir, out, images[1:], "--resume")
    assert status == 2
    assert len(err.strip().splitlines()) == 1, err
    assert f"such as {str(images[0])!r}" in err and "--overwrite" in err, err
    assert all(p.read_bytes() == data for p, data in before.items())


def _unreadable_run(model: Path, out: Path, tmp_path: Path) -> None:
    """An unfinished run: its only input unreadable, so it stays in FEATURES.partial/."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert embed_small(model, out, [broken]).rows == 0


@pytest.mark.parametrize(
    ("damaged", "how"),
    [
        ("features.manifest.json", "truncate"),
        ("features.manifest.json", "list"),
        ("features.npy", "truncate"),
        ("features.partial/run.json", "truncate"),
        ("features.partial/run.json", "list"),
        ("features.partial/status.npy", "truncate"),
        ("features.partial/features.npy", "truncate"),
        ("features.partial/finished.json", "truncate"),
    ],
)
def test_damaged_run_files_are_named_and_overwrite_gets_past_them(
    model_dir, images, tmp_path, capsys, damaged, how
):
    out = tmp_path / "features.npy"
    if "partial" in damaged:
        _unreadable_run(model_dir, out, tmp_path)
    else:
        embed_small(model_dir, out, images)
    target = tmp_path / damaged
    if damaged.endswith("finished.json"):
        target.write_text(json.dumps({"features_file": "features.npy", "manifest": {}}))
    if how == "list":
        target.write_text("[1, 2]")
    else:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    capsys.readouterr()
    status, err = _cli(capsys, model_dir, out, images, "--resume")
    assert status == 2
    assert len(err.strip().splitlines()) == 1, err
    assert f"{str(target)!r} is damaged" in err and "--overwrite" in err, err
    status, err = _cli(capsys, model_dir, out, images, "--overwrite")
    assert status == 0, err
    assert np.load(out).shape[0] == 3
