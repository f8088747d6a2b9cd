"""``embed --engine ray`` on a local Ray cluster (one for the session): rows equal to the local
engine's, corrupt files named and skipped, resume without redoing parts, existing outputs
refused, a killed task's retry without a duplicate row, ``Embedder`` in a pipeline of one's
own, and the command line starting a cluster of its own. A tiny model and 28-pixel crops."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dinov2_fast
from dinov2_fast._resolve import UserError
from dinov2_fast.embedding import ray_engine, sinks
from tests._embedding import embed_small
from tests._models import hf_model

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-CPU cluster whose workers import this checkout; yields the folder of the
    fail-once hook (``ray_engine._FAIL_ONCE_ENV``), which a test creates to arm it."""
    hook = tmp_path_factory.mktemp("hook") / "fail-once"
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {"PYTHONPATH": path, ray_engine._FAIL_ONCE_ENV: str(hook)}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=2**28,
        log_to_driver=False,
        runtime_env={"env_vars": env},
    )
    try:
        where = ray.get(ray.remote(lambda: dinov2_fast.__file__).remote())
        assert Path(where).resolve() == Path(dinov2_fast.__file__).resolve()
        yield hook
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    hf_model().save_pretrained(folder)
    return folder


def _png(seed: int, height: int, width: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture()
def images(tmp_path: Path) -> list[Path]:
    """Five images of different sizes, then a file that is no image."""
    folder = tmp_path / "images"
    folder.mkdir()
    sizes = [(40, 30), (32, 48), (36, 36), (30, 44), (29, 29)]
    paths = []
    for index, (height, width) in enumerate(sizes):
        paths.append(folder / f"img{index}.png")
        paths[-1].write_bytes(_png(index, height, width))
    paths.append(folder / "img5.png")
    paths[-1].write_bytes(b"not a png")
    return paths


@pytest.fixture()
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two rows per Parquet part (the tiny model's rows are 64 float32), so runs have several."""
    monkeypatch.setattr(sinks, "_PART_BYTES", 2 * 64 * 4)


def _rows(out: Path) -> dict[str, np.ndarray]:
    import pyarrow.dataset

    table = pyarrow.dataset.dataset(out, format="parquet").to_table()
    width = table.schema.field("embedding").type.list_size
    embedding = table.column("embedding").combine_chunks().flatten().to_numpy()
    return dict(zip(table.column("path").to_pylist(), embedding.reshape(-1, width), strict=True))


def _manifest(out: Path) -> dict:
    return json.loads(out.with_suffix(".manifest.json").read_text())


def _ray(model_dir: Path, out: Path, inputs: list[Path], **options):
    return embed_small(model_dir, out, inputs, format="parquet", engine="ray", **options)


def test_rows_equal_the_local_engine_and_a_corrupt_file_is_named(
    cluster, model_dir, images, tmp_path, capsys
):
    shard = tmp_path / "00000.tar"  # webdataset: members keyed TAR::MEMBER, one damaged
    with tarfile.open(shard, "w") as tar:
        for name, data in [("a.png", _png(7, 33, 41)), ("b.jpg", b"not a jpeg")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    inputs = [*images, shard]
    local, out = tmp_path / "local", tmp_path / "ray"
    embed_small(model_dir, local, inputs, format="parquet")
    capsys.readouterr()
    result = _ray(model_dir, out, inputs)
    assert (result.rows, result.skipped) == (6, 2)
    stderr = capsys.readouterr().err
    assert f"skipped {str(images[5])!r}: cannot identify the image format" in stderr
    assert f"skipped '{shard}::b.jpg'" in stderr
    ours, theirs = _rows(out), _rows(local)
    assert sorted(ours) == sorted(theirs) == sorted([*map(str, images[:5]), f"{shard}::a.png"])
    for path, row in theirs.items():
        np.testing.assert_allclose(ours[path], row, rtol=1e-5, atol=1e-6)
    manifest, expected = _manifest(out), _manifest(local)
    # The same settings and skipped inputs; rows in the parts' order, which the manifest follows.
    assert manifest["inputs"] == list(ours)
    assert {**manifest, "features": None, "inputs": None} == {
        **expected,
        "features": None,
        "inputs": None,
    }
    schema = pq.read_schema(next(out.glob("part-*.parquet")))
    assert schema.equals(pq.read_schema(local / "part-00000.parquet"), check_metadata=True)


def test_resume_embeds_only_the_rest_and_leaves_the_parts_written(
    cluster, model_dir, images, tmp_path, small_parts, capsys
):
    out = tmp_path / "features"
    # A finished output of the local engine: its parts are the ones the ray engine writes
    # (the same schema, as tested above).
    embed_small(model_dir, out, images[:3], format="parquet")
    first = {part: part.stat().st_mtime_ns for part in out.glob("part-*.parquet")}
    assert len(first) == 2  # parts of two rows at most
    with pytest.raises(UserError, match="already exists: add --resume"):
        _ray(model_dir, out, images)
    with pytest.raises(UserError, match="written with pool='cls'"):
        _ray(model_dir, out, images, pool="mean", resume=True)
    with pytest.raises(UserError, match="1 of its inputs are not among this run's"):
        _ray(model_dir, out, images[1:], resume=True)
    capsys.readouterr()
    result = _ray(model_dir, out, images, resume=True)
    assert (result.rows, result.skipped) == (5, 1)
    assert "resuming: 3 of 6 rows already written" in capsys.readouterr().err
    assert {part: part.stat().st_mtime_ns for part in first} == first
    new = sorted(set(out.glob("part-*.parquet")) - set(first))
    held = [path for part in new for path in pq.read_table(part).column("path").to_pylist()]
    assert sorted(held) == [str(p) for p in images[3:5]]
    # Rows in the order of the parts' names (the local engine's first), as the manifest says.
    assert list(_rows(out)) == _manifest(out)["inputs"]
    assert sorted(_manifest(out)["inputs"]) == [str(p) for p in images[:5]]


def test_a_killed_write_task_is_retried_without_a_second_copy_of_its_rows(
    cluster, model_dir, images, tmp_path
):
    out = tmp_path / "features"
    embed_small(model_dir, out, images[:2], format="parquet")  # the local engine's output
    with pytest.raises(UserError, match="already exists: add --resume"):
        _ray(model_dir, out, images)
    cluster.mkdir()  # arms the hook: the first part's writer dies after renaming it
    try:
        result = _ray(model_dir, out, images, overwrite=True)
    finally:
        failed = (cluster / "failed").exists()
        shutil.rmtree(cluster)
    assert failed
    assert (result.rows, result.skipped) == (5, 1)
    assert len(list(out.glob("part-*.parquet"))) == 1
    assert sorted(_rows(out)) == sorted(_manifest(out)["inputs"]) == [str(p) for p in images[:5]]


def test_the_final_check_names_a_duplicate_or_missing_row(model_dir, images, tmp_path):
    out = tmp_path / "features"
    embed_small(model_dir, out, images, format="parquet")
    inputs = [str(p) for p in images]
    skipped = {inputs[5]: "not an image"}
    assert ray_engine._check_rows(out, inputs, skipped) == inputs[:5]
    with pytest.raises(UserError, match=r"1 inputs got no row and were not skipped.*img5"):
        ray_engine._check_rows(out, inputs, {})
    shutil.copy(out / "part-00000.parquet", out / "part-copy.parquet")
    with pytest.raises(UserError, match="5 inputs have more than one row"):
        ray_engine._check_rows(out, inputs, skipped)


def test_embedder_in_a_pipeline_of_ones_own(cluster, model_dir, images):
    files = [p.read_bytes() for p in images]
    ds = ray.data.from_items([{"key": i, "bytes": data} for i, data in enumerate(files)])
    ds = ds.map_batches(
        ray_engine.Embedder,
        fn_constructor_kwargs={"model": str(model_dir), "size": 28, "device": "cpu"},
        batch_size=3,
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    rows = sorted(ds.take_all(), key=lambda row: row["key"])
    expected = dinov2_fast.embed(images[:5], str(model_dir), crop_size=28, device="cpu")
    got = np.stack([row["embedding"] for row in rows[:5]])
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert [row["skip_reason"] for row in rows[:5]] == [""] * 5
    assert "cannot identify the image format" in rows[5]["skip_reason"]
    assert np.isnan(rows[5]["embedding"]).all()


def test_embedder_takes_pixel_arrays_and_names_a_missing_column(model_dir, images):
    embedder = ray_engine.Embedder(str(model_dir), pool="cls+mean", size=28, device="cpu")
    pixels = [np.asarray(Image.open(p)) for p in images[:2]]
    batch = embedder({"image": np.array([*pixels, np.zeros((2, 2), np.float32)], dtype=object)})
    expected = dinov2_fast.embed(pixels, str(model_dir), pool="cls+mean", crop_size=28)
    np.testing.assert_allclose(batch["embedding"][:2], expected.numpy(), rtol=1e-5, atol=1e-6)
    assert batch["embedding"].shape == (3, 128)
    assert "must be uint8" in batch["skip_reason"][2]
    with pytest.raises(ValueError, match="a 'bytes' or 'image' column, got \\['path'\\]"):
        embedder({"path": np.array(["a.png"])})


def test_embedder_refuses_gpu_decoding(model_dir, monkeypatch):
    from dinov2_fast.embedding import gpu_decode

    monkeypatch.setattr(gpu_decode, "check_gpu_decode", lambda device: None)
    with pytest.raises(ValueError, match="Embedder decodes on Ray's CPU workers"):
        ray_engine.Embedder(str(model_dir), size=28, device="cpu", decode="gpu")


def test_an_empty_shard_gets_one_empty_part_and_overwrite_drops_a_local_run(
    cluster, model_dir, images, tmp_path
):
    out = tmp_path / "shard0"
    _ray(model_dir, out, images[:2], num_shards=3, shard_index=0)
    assert _manifest(out)["inputs"] == []
    table = sinks.FORMATS["parquet"].read(out, [], [64])
    assert table.shape == (0, 64)
    # A local run cut short before it made its --out: --overwrite drops it all the same.
    fresh = tmp_path / "fresh"
    partial = ray_engine._partial_dir(fresh)
    partial.mkdir()
    (partial / "run.json").write_text("{}")
    ray_engine._prepare(fresh, [], {}, resume=False, overwrite=True)
    assert not partial.exists() and fresh.is_dir()


def test_engine_ray_needs_parquet(model_dir, images, tmp_path):
    with pytest.raises(UserError, match="--ray-address names the cluster of --engine ray"):
        embed_small(model_dir, tmp_path / "f.npy", images, ray_address="127.0.0.1:6379")
    with pytest.raises(UserError, match="--engine ray writes Parquet parts.*add --format parquet"):
        embed_small(model_dir, tmp_path / "features", images, engine="ray")
    with pytest.raises(UserError, match="--engine must be one of local, ray"):
        embed_small(model_dir, tmp_path / "features.npy", images, engine="spark")


def test_the_command_line_starts_a_cluster_of_its_own(model_dir, images, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # Paths relative to the command's folder, which the cluster's workers need not share.
    inputs = [os.path.relpath(p, tmp_path) for p in images]
    model = os.path.relpath(model_dir, tmp_path)
    args = ["--model", model, "--out", "features", "--format", "parquet", "--engine", "ray"]
    command = [sys.executable, "-m", "dinov2_fast", "embed", *inputs, *args, "--size", "28"]
    done = subprocess.run(
        [*map(str, command), "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "features: features (5 x 64, float32, Parquet parts)" in done.stdout
    assert f"skipped {inputs[5]!r}" in done.stderr
    assert sorted(_rows(tmp_path / "features")) == inputs[:5]
