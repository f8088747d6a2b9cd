"""The dinov2-fast CLI, run as a subprocess the way users run it.

The truth for features is transformers: its BitImageProcessor (PIL backend, configured as
the facebook/dinov2-* checkpoints are) and its Dinov2Model, on a small random model saved
with transformers' own save_pretrained. Runs use ``--device cpu`` so the numbers are the same
on every machine; ``verify`` takes the Triton path through the interpreter. Two hooks reach
inside the CLI: ``DINOV2_FAST_VERIFY_PLANT`` (verify perturbs the fast path's weights: a
planted mismatch) and a FIFO among the inputs, which blocks the reader so a run can be
killed mid-way. Errors raised before any model runs, and the disk and crash cases that need
a patched ``os``, are checked in this process, where they cost no interpreter start.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
READABLE = [
    "a_rgb.jpg",
    "b_grey.png",
    "e_palette.gif",
    "nested/c_rgba.png",
    "nested/d_square.jpeg",
]
UNREADABLE = ["nested/truncated.jpg", "zz_corrupt.jpg"]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # The CLI's backend choice is under test, so no interpreter or forced backend leaks in.
    env = {
        k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DINOV2_FAST_BACKEND")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, **(extra or {})}


def _command(*args: object, launcher: tuple[str, ...] = (sys.executable,)) -> list[str]:
    return [*launcher, "-m", "dinov2_fast", *map(str, args)]


def _cli(*args: object, extra_env: dict[str, str] | None = None, **launcher: tuple[str, ...]):
    return subprocess.run(
        _command(*args, **launcher),
        capture_output=True,
        text=True,
        env=_env(extra_env),
        timeout=300,
    )


def _random_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _write_images(folder: Path) -> None:
    rng = np.random.default_rng(0)
    (folder / "nested").mkdir(parents=True)
    _random_image(rng, 300, 400).save(folder / "a_rgb.jpg")
    _random_image(rng, 401, 299).convert("L").save(folder / "b_grey.png")
    _random_image(rng, 90, 120).convert("P").save(folder / "e_palette.gif")
    _random_image(rng, 50, 37).convert("RGBA").save(folder / "nested/c_rgba.png")
    _random_image(rng, 256, 256).save(folder / "nested/d_square.jpeg")
    jpeg = (folder / "a_rgb.jpg").read_bytes()
    (folder / "nested/truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "zz_corrupt.jpg").write_bytes(b"this is not an image")
    (folder / "notes.txt").write_text("not an image name: ignored")
    shutil.copy(folder / "a_rgb.jpg", folder / ".hidden.jpg")


def _save_random_model(folder: Path, config) -> None:
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config)
    with torch.no_grad():
        # Norm weights, biases and registers start as ones and zeros, which hide mistakes.
        for param in model.parameters():
            if param.dim() <= 1 or param.abs().max() == 0:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    _write_images(root / "images")
    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=518)
    _save_random_model(
        root / "model", transformers.Dinov2Config(**shape, patch_size=14, layerscale_value=0.5)
    )
    _save_random_model(
        root / "model_registers",
        transformers.Dinov2WithRegistersConfig(**shape, patch_size=14, num_register_tokens=4),
    )
    return root


def _processor(crop: int = 224):
    """transformers' image processor as the facebook/dinov2-* checkpoints configure it."""
    return transformers.BitImageProcessorPil(
        size={"shortest_edge": round(crop * 256 / 224)},
        crop_size={"height": crop, "width": crop},
        resample=3,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )


def _expected(
    workspace: Path, paths: list[str], pool: str = "cls", crop: int = 224, model: str = "model"
) -> np.ndarray:
    net = transformers.AutoModel.from_pretrained(workspace / model).eval()
    images = [Image.open(p) for p in paths]
    pixels = _processor(crop)(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        output = net(pixel_values=pixels)
    patches = output.last_hidden_state[:, 1 + getattr(net.config, "num_register_tokens", 0) :]
    pooled = {
        "cls": output.pooler_output,
        "mean": patches.mean(1),
        "cls+mean": torch.cat([output.pooler_output, patches.mean(1)], dim=-1),
        "patch": patches,
    }[pool]
    return pooled.numpy()


def _assert_close(features: np.ndarray, expected: np.ndarray) -> None:
    assert features.shape == expected.shape
    assert np.linalg.norm(features - expected) / np.linalg.norm(expected) < 1e-3


def _manifest(features: Path) -> dict:
    return json.loads(features.with_suffix(".manifest.json").read_text())


def _embed_args(
    workspace: Path,
    out: Path,
    *inputs: object,
    extra: tuple = (),
    model: str = "model",
    workers: int | None = 0,
) -> list[object]:
    options = ["--model", workspace / model, "--out", out, "--device", "cpu", *extra]
    # No decoding process by default (faster on a small machine); None: the CLI's default.
    options += [] if workers is None else ["--workers", workers]
    return ["embed", *inputs, *options]


def _embed(workspace: Path, out: Path, *inputs: object, **options):
    return _cli(*_embed_args(workspace, out, *inputs, **options))


def _main(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str]:
    """The CLI in this process: its exit status and stderr."""
    from dinov2_fast.cli import main

    try:
        status = main([str(a) for a in args])
    except SystemExit as exit:
        status = exit.code
    return status, capsys.readouterr().err


@pytest.fixture(scope="module")
def single_run(workspace: Path) -> tuple[Path, subprocess.CompletedProcess]:
    # The default --workers (1 on the CPU): images decoded in a DataLoader worker process.
    out = workspace / "single" / "features.npy"
    extra = ("--batch-size", "3")
    return out, _embed(workspace, out, workspace / "images", extra=extra, workers=None)


def test_embed_folder_matches_transformers_and_skips_unreadable_files(workspace, single_run):
    out, run = single_run
    assert run.returncode == 0, run.stderr
    manifest = _manifest(out)
    images = workspace / "images"
    assert manifest["inputs"] == [str(images / name) for name in READABLE]
    assert [s["path"] for s in manifest["skipped"]] == [str(images / n) for n in UNREADABLE]
    assert all(s["reason"] for s in manifest["skipped"])
    for name in UNREADABLE:
        assert f"skipped {str(images / name)!r}: " in run.stderr
    assert f"features: {out} (5 x 64, float32)" in run.stdout
    _assert_close(np.load(out), _expected(workspace, manifest["inputs"]))
    assert not out.with_suffix(".partial").exists()


@pytest.mark.parametrize(
    ("pool", "crop", "model"),
    [
        ("mean", 224, "model"),
        ("cls+mean", 224, "model_registers"),
        ("patch", 112, "model_registers"),
    ],
)
def test_pools_sizes_and_registers_match_transformers(workspace, tmp_path, pool, crop, model):
    paths = [workspace / "images" / name for name in ("b_grey.png", "nested/c_rgba.png")]
    out = tmp_path / ("features.NPY" if pool == "patch" else "features.npy")
    run = _embed(workspace, out, *paths, extra=("--pool", pool, "--size", str(crop)), model=model)
    assert run.returncode == 0, run.stderr
    expected = _expected(workspace, [str(p) for p in paths], pool, crop, model)
    _assert_close(np.load(out), expected)
    assert _manifest(out)["feature_shape"] == list(expected.shape[1:])


def test_nothing_readable_exits_non_zero_and_keeps_the_earlier_output(
    workspace, single_run, tmp_path, capsys
):
    out = tmp_path / "features.npy"
    for name in (out.name, "features.manifest.json"):
        shutil.copy(single_run[0].parent / name, tmp_path / name)
    earlier = {path: path.read_bytes() for path in tmp_path.iterdir()}
    corrupt = workspace / "images" / "zz_corrupt.jpg"
    run = _embed(workspace, out, corrupt, extra=("--overwrite",))
    assert run.returncode == 1
    assert f"skipped {str(corrupt)!r}" in run.stderr
    assert "no input could be read" in run.stderr and "nothing written to" in run.stderr
    assert all(path.read_bytes() == data for path, data in earlier.items())
    # The run is kept, and a plain rerun says how to continue it.
    status, err = _main(capsys, *_embed_args(workspace, out, corrupt))
    assert status == 2 and "unfinished run" in err and "--resume" in err, err


def _wait_for_rows(status: Path, rows: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if status.is_file() and np.count_nonzero(np.load(status) == 1) >= rows:
            return
        time.sleep(0.1)
    raise AssertionError(f"{status} never showed {rows} finished rows")


def test_resume_continues_a_killed_run_and_extends_a_finished_one(workspace, tmp_path):
    images = workspace / "images"
    blocker = tmp_path / "late.png"
    os.mkfifo(blocker)
    inputs = [images / "a_rgb.jpg", images / "b_grey.png", blocker, images / "nested/c_rgba.png"]
    out = tmp_path / "features.npy"
    # Reading the FIFO blocks until a writer comes, so the run stops after two rows.
    process = subprocess.Popen(
        _command(*_embed_args(workspace, out, *inputs, extra=("--batch-size", "1"))),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_rows(out.with_suffix(".partial") / "status.npy", 2, process)
    finally:
        process.kill()
        process.wait()
    blocker.unlink()
    shutil.copy(images / "nested/d_square.jpeg", blocker)

    run = _embed(workspace, out, *inputs, extra=("--resume",))
    assert run.returncode == 0, run.stderr
    assert "resuming: 2 of 4 rows already written" in run.stderr
    paths = _manifest(out)["inputs"]
    _assert_close(np.load(out), _expected(workspace, paths))

    # A finished run, one more input: only that one is computed; the rest are kept as written.
    written = np.load(out, mmap_mode="r+")
    written[0] = 7.0
    written.flush()
    del written
    extra_image = images / "e_palette.gif"
    run = _embed(workspace, out, *inputs, extra_image, extra=("--resume",))
    assert run.returncode == 0, run.stderr
    assert "resuming: 4 of 5 rows already written" in run.stderr
    features = np.load(out)
    assert (features[0] == 7.0).all()
    assert _manifest(out)["inputs"] == [*paths, str(extra_image)]
    _assert_close(features[1:], _expected(workspace, [*paths[1:], str(extra_image)]))


def test_resume_refuses_other_settings(workspace, single_run):
    out, _ = single_run
    run = _embed(workspace, out, workspace / "images", extra=("--resume", "--pool", "mean"))
    assert run.returncode == 2
    assert "pool='cls'" in run.stderr and "'mean'" in run.stderr


def test_torchrun_two_processes_write_the_single_process_result(workspace, single_run, tmp_path):
    single, _ = single_run
    out = tmp_path / "features.npy"
    run = _cli(
        *_embed_args(workspace, out, workspace / "images", extra=("--batch-size", "2")),
        launcher=(
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
        ),
    )
    assert run.returncode == 0, run.stderr
    assert _manifest(out) == _manifest(single)
    np.testing.assert_array_equal(np.load(out), np.load(single))


def test_verify_passes_and_catches_a_planted_mismatch(workspace):
    # The Triton interpreter runs the real fast path on the CPU; the model is tiny enough.
    args = ("verify", "--model", workspace / "model", "--image-size", "56", "--batch-size", "1")
    args += ("--device", "cpu", "--dtype", "float32", "--backend", "triton")
    interpret = {"TRITON_INTERPRET": "1"}
    run = _cli(*args, extra_env=interpret)
    assert run.returncode == 0, run.stdout + run.stderr
    launches = re.search(r"\((\d+) Triton kernel launches\)", run.stdout)
    assert launches and int(launches.group(1)) > 0, run.stdout
    assert "layer 2" in run.stdout and "pooler_output" in run.stdout
    assert "PASS" in run.stdout
    planted = _cli(*args, extra_env={**interpret, "DINOV2_FAST_VERIFY_PLANT": "0.05"})
    assert planted.returncode == 1, planted.stdout + planted.stderr
    assert "FAIL" in planted.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("embed", "{images}", "--model", "{tmp}/no-such-model", "--out", "{tmp}/f.npy"),
            "model not found",
        ),
        (("embed", "{tmp}/empty", "--model", "{model}", "--out", "{tmp}/f.npy"), "no images in"),
        (
            (
                "embed",
                "{images}",
                "--model",
                "{model}",
                "--out",
                "{tmp}/f.npy",
                "--dtype",
                "float64",
            ),
            "invalid choice",
        ),
        (
            ("embed", "{tmp}/missing.jpg", "--model", "{model}", "--out", "{tmp}/f.npy"),
            "no such file",
        ),
        (("embed", "{images}", "--model", "{model}", "--out", "{tmp}/f.txt"), ".npy"),
        (("embed", "{images}", "--model", "small", "--out", "{tmp}/f.npy"), "random-weight"),
        (("verify", "--model", "{model}", "--device", "cpu", "--backend", "triton"), "interpreter"),
    ],
)
def test_bad_arguments_give_one_line_errors(workspace, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    names = {"images": workspace / "images", "model": workspace / "model", "tmp": tmp_path}
    run = _cli(*(a.format(**names) for a in args))
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dinov2-fast"), run.stderr
    assert message in lines[0]


def test_info_and_bench(workspace):
    info = _cli("info")
    assert info.returncode == 0, info.stderr
    assert "backend triton" in info.stdout and "torch" in info.stdout
    bench = _cli(
        "bench",
        "--model",
        workspace / "model",
        "--batch",
        "2",
        "--iters",
        "1",
        "--image-size",
        "56",
        "--device",
        "cpu",
    )
    assert bench.returncode == 0, bench.stderr
    assert "transformers" in bench.stdout and "images/s" in bench.stdout


def _normalized(image: Image.Image, crop: int = 224) -> np.ndarray:
    """Our pipeline's two halves on one image: the uint8 crop, then the normalisation."""
    from dinov2_fast.embedding.preprocess import crop_pixels, normalize

    return normalize(torch.from_numpy(crop_pixels(image, crop))).numpy()


@pytest.mark.parametrize("crop", [224, 98, 518])
def test_preprocess_is_pixel_exact_with_transformers(crop):
    from dinov2_fast.embedding.preprocess import crop_pixels

    processor = _processor(crop)
    uint8_processor = _processor(crop)
    uint8_processor.do_rescale = uint8_processor.do_normalize = False
    rng = np.random.default_rng(crop)
    for (height, width), mode in [
        ((300, 400), "RGB"),
        ((401, 299), "L"),
        ((50, 37), "RGBA"),
        ((256, 256), "RGB"),
        ((1000, 77), "P"),
        ((123, 457), "LA"),
        ((3, 700), "RGB"),  # enlarged at an extreme aspect ratio: only the crop is computed
        ((900, 5), "L"),
    ]:
        image = _random_image(rng, height, width).convert(mode)
        crop_values = uint8_processor(image, return_tensors="np")["pixel_values"][0]
        np.testing.assert_array_equal(crop_pixels(image, crop), crop_values)
        expected = processor(image, return_tensors="np")["pixel_values"][0]
        # On the CPU the float32 normalisation is transformers' to the bit.
        np.testing.assert_array_equal(_normalized(image, crop), expected)


def test_inputs_keep_command_line_order_sort_within_folders_and_globs_and_drop_repeats(
    workspace, monkeypatch
):
    from dinov2_fast.embedding import collect_inputs

    monkeypatch.chdir(workspace)
    inputs = collect_inputs(
        ["images/nested/d_square.jpeg", "images/**/*.png", "images/nested"]
    ).paths
    assert inputs == [
        "images/nested/d_square.jpeg",
        "images/b_grey.png",
        "images/nested/c_rgba.png",
        "images/nested/truncated.jpg",
    ]


def test_symlinked_folders_are_followed_once_and_files_kept_once(tmp_path, monkeypatch):
    from dinov2_fast.embedding import collect_inputs

    rng = np.random.default_rng(1)
    (tmp_path / "photos/sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for name in ("photos/a.png", "photos/sub/b.png", "elsewhere/c.png"):
        _random_image(rng, 20, 20).save(tmp_path / name)
    (tmp_path / "photos/sub/loop").symlink_to("..")  # a loop back up
    (tmp_path / "photos/linked").symlink_to("../elsewhere")  # a linked folder
    (tmp_path / "photos/a_again.png").symlink_to("a.png")  # a linked file
    monkeypatch.chdir(tmp_path)
    found = ["photos/a.png", "photos/linked/c.png", "photos/sub/b.png"]
    assert collect_inputs(["photos"]).paths == found
    assert collect_inputs(["photos/**/*.png"]).paths == found
    assert collect_inputs(["photos/**"]).paths == found
    # The same file through another path keeps the first path given.
    assert collect_inputs(["elsewhere/c.png", "photos"]).paths == ["elsewhere/c.png", *found[::2]]


def test_exif_orientation_is_applied_as_transformers_load_image_does(tmp_path):
    from transformers.image_utils import load_image as transformers_load_image

    from dinov2_fast.embedding.preprocess import load_image

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    path = tmp_path / "rotated.jpg"
    _random_image(np.random.default_rng(6), 200, 320).save(path, exif=exif)
    expected = _processor()(transformers_load_image(str(path)), return_tensors="np")
    image = load_image(path)
    assert image.size == (200, 320)  # upright: width and height swapped
    np.testing.assert_array_equal(_normalized(image), expected["pixel_values"][0])


@pytest.mark.parametrize(
    ("setup", "extra", "message"),
    [
        ("out", (), "already exists: add --resume"),
        ("manifest", (), "features.manifest.json' already exists"),
        ("partial", (), "unfinished run"),
        ("out", ("--resume", "--overwrite"), "not allowed with argument"),
        ("folder", ("--overwrite",), "cannot write --out"),
        ("under_file", ("--overwrite",), "is not a folder"),
    ],
)
def test_out_is_checked_before_the_model_loads(tmp_path, capsys, setup, extra, message):
    out = tmp_path / "features.npy"
    if setup == "out":
        np.save(out, np.zeros(1))
    elif setup == "manifest":
        out.with_suffix(".manifest.json").write_text("{}")
    elif setup == "partial":
        partial = out.with_suffix(".partial")
        partial.mkdir()
        for name in ("run.json", "features.npy", "status.npy"):
            (partial / name).write_text("")
    elif setup == "folder":
        out.mkdir()
    else:
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "features.npy"
    image = tmp_path / "a.png"
    _random_image(np.random.default_rng(0), 20, 20).save(image)
    # The model does not exist: an error about --out shows it was checked first.
    args = ("embed", image, "--model", tmp_path / "no-model", "--out", out, *extra)
    status, err = _main(capsys, *args)
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("--image-size", "10"), {}, "dinov2-fast: error: --image-size 10 is smaller than"),
        ((), {"DINOV2_FAST_VERIFY_PLANT": "abc"}, "must be a number"),
        # An error only one rank met is printed by that rank, with its number.
        (("--image-size", "10"), {"RANK": "1"}, "dinov2-fast: error: rank 1: --image-size 10"),
    ],
)
def test_verify_and_bench_refuse_bad_sizes_with_one_line(
    workspace, capsys, monkeypatch, args, env, message
):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for command in ("verify", "bench"):
        if command == "bench" and not args:
            continue
        status, err = _main(
            capsys, command, "--model", workspace / "model", "--device", "cpu", *args
        )
        assert status == 2
        assert len(err.strip().splitlines()) == 1 and message in err, err


def test_a_file_that_is_no_checkpoint_is_named_without_torch_load_advice(tmp_path, capsys):
    (tmp_path / "weights.pth").write_text("not a checkpoint")
    image = tmp_path / "a.png"
    _random_image(np.random.default_rng(0), 20, 20).save(image)
    args = ("--model", tmp_path / "weights.pth", "--out", tmp_path / "f.npy", "--device", "cpu")
    status, err = _main(capsys, "embed", image, *args)
    assert status == 2 and "not a PyTorch checkpoint" in err, err
    assert "weights_only" not in err


def test_an_error_every_rank_shares_is_printed_by_rank_0_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    args = ("embed", tmp_path / "missing.png", "--model", "m", "--out", tmp_path / "f.npy")
    status, err = _main(capsys, *args)
    assert status == 2 and err == ""


@pytest.mark.parametrize(("rank", "printed"), [("0", "dinov2-fast: interrupted\n"), ("1", "")])
def test_ctrl_c_is_reported_once_under_torchrun(capsys, monkeypatch, rank, printed):
    from dinov2_fast import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_diagnostic", interrupted)
    monkeypatch.setenv("RANK", rank)
    assert _main(capsys, "verify") == (130, printed)


def _embed_here(workspace: Path, out: Path, inputs: list[Path], **options):
    from dinov2_fast.embedding import embed_images

    return embed_images(
        [str(p) for p in inputs],
        str(workspace / "model"),
        out,
        device="cpu",
        workers=0,
        show_progress=False,
        **options,
    )


def test_a_full_disk_is_an_error_not_a_crash(workspace, tmp_path, monkeypatch):
    from dinov2_fast._resolve import UserError
    from dinov2_fast.embedding import sinks

    inputs = [workspace / "images" / name for name in ("a_rgb.jpg", "zz_corrupt.jpg")]
    out = tmp_path / "features.npy"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(sinks.shutil, "disk_usage", lambda _: usage._replace(free=100))
    with pytest.raises(UserError, match="not enough disk space .* for 2 rows"):
        _embed_here(workspace, out, inputs)

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sinks.shutil, "disk_usage", lambda _: usage)
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(UserError, match="not enough disk space"):
        _embed_here(workspace, out, inputs)
    assert sorted(tmp_path.iterdir()) == []  # nothing half made is left

    # Room for the rows, none for the compacted copy a skipped file calls for at the end.
    monkeypatch.undo()
    frees = iter([usage.free, 100])
    monkeypatch.setattr(sinks.shutil, "disk_usage", lambda _: usage._replace(free=next(frees)))
    with pytest.raises(UserError, match="rows read .* --resume"):
        _embed_here(workspace, out, inputs)
    monkeypatch.undo()
    assert _embed_here(workspace, out, inputs, resume=True).rows == 1


@pytest.mark.parametrize(
    "interrupted_at", ["finished.json.tmp", "compact.npy", "manifest.json.tmp"]
)
def test_an_interrupted_finish_is_completed_by_the_next_run(
    workspace, tmp_path, monkeypatch, capsys, interrupted_at
):
    from dinov2_fast._resolve import UserError

    images = workspace / "images"
    inputs = [images / "a_rgb.jpg", images / "zz_corrupt.jpg", images / "b_grey.png"]
    clean = tmp_path / "clean" / "features.npy"
    _embed_here(workspace, clean, inputs)
    out = tmp_path / "cut" / "features.npy"
    replace = os.replace

    def cut(source, target):
        if str(source).endswith(interrupted_at):
            raise KeyboardInterrupt
        replace(source, target)

    monkeypatch.setattr(os, "replace", cut)
    with pytest.raises(KeyboardInterrupt):
        _embed_here(workspace, out, inputs)
    monkeypatch.undo()
    # After the commit (finished.json), any later run completes the finish first; before
    # it, the run is unfinished with its rows done, and --resume retries only the skipped file.
    committed = interrupted_at != "finished.json.tmp"
    with pytest.raises(UserError, match="already exists" if committed else "unfinished run"):
        _embed_here(workspace, out, inputs)
    if not committed:
        capsys.readouterr()
        assert _embed_here(workspace, out, inputs, resume=True).rows == 2
        assert "resuming: 2 of 3 rows already written" in capsys.readouterr().err
    assert not out.with_suffix(".partial").exists()
    assert _manifest(out) == _manifest(clean)
    np.testing.assert_array_equal(np.load(out), np.load(clean))


def test_a_shard_with_no_inputs_succeeds_with_an_empty_output(workspace, tmp_path, capsys):
    image = workspace / "images" / sorted(p.name for p in (workspace / "images").glob("*.png"))[0]
    out = tmp_path / "shard0.npy"
    extra = ("--num-shards", 2, "--shard-index", 0)
    status, err = _main(capsys, *_embed_args(workspace, out, image, extra=extra))
    assert status == 0, err
    assert np.load(out).shape[0] == 0
