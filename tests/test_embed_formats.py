"""Output formats and sharded runs of ``embed``: Parquet parts read by pyarrow as one table
with the npy run's rows, resume and overwrite as for npy, atomic parts; shards that split
the listing without overlap or gap, and ``merge``. In-process runs on a tiny model and
28-pixel crops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinov2_fast._resolve import UserError
from dinov2_fast.embedding import sinks
from dinov2_fast.embedding.sources import shard_of
from tests._embedding import embed_small
from tests._models import hf_model

pa = pytest.importorskip("pyarrow")
pytest.importorskip("pyarrow.dataset")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    hf_model().save_pretrained(folder)
    return folder


@pytest.fixture()
def images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for index, (height, width) in enumerate([(40, 30), (32, 48), (36, 36), (30, 44), (29, 29)]):
        path = folder / f"img{index}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    (folder / "img5.png").write_bytes(b"not a png")
    return [*paths, folder / "img5.png"]


@pytest.fixture()
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two rows per Parquet part (the tiny model's rows are 64 float32), so runs have several."""
    monkeypatch.setattr(sinks, "_PART_BYTES", 2 * 64 * 4)


def _table(out: Path):
    import pyarrow.dataset

    return pyarrow.dataset.dataset(out, format="parquet").to_table()


def _manifest(out: Path) -> dict:
    return json.loads(out.with_suffix(".manifest.json").read_text())


def test_parquet_parts_are_one_table_with_the_npy_rows(model_dir, images, tmp_path, small_parts):
    npy = tmp_path / "features.npy"
    embed_small(model_dir, npy, images)
    out = tmp_path / "parts"
    result = embed_small(model_dir, out, images, format="parquet")
    assert (result.rows, result.skipped) == (5, 1)
    assert sorted(p.name for p in out.iterdir()) == [f"part-0000{i}.parquet" for i in range(3)]
    table = _table(out)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 64)
    assert table.column("path").to_pylist() == [str(p) for p in images[:5]]
    embedding = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(5, 64)
    np.testing.assert_array_equal(embedding, np.load(npy))
    settings = json.loads(table.schema.metadata[b"dinov2_fast"])
    assert settings["pool"] == "cls" and settings["crop_size"] == 28
    assert settings["embedding_shape"] == [64] and settings["library_version"]
    assert settings["model_fingerprint"] == _manifest(npy)["model_fingerprint"]
    manifest = _manifest(out)
    assert manifest["format"] == "parquet" and manifest["shape"] == [5, 64]
    assert [s["path"] for s in manifest["skipped"]] == [str(images[5])]


def test_parquet_patch_pool_is_flattened_with_its_shape_in_the_metadata(
    model_dir, images, tmp_path
):
    out = tmp_path / "patches"
    embed_small(model_dir, out, images[:2], format="parquet", pool="patch")
    table = _table(out)
    shape = json.loads(table.schema.metadata[b"dinov2_fast"])["embedding_shape"]
    assert shape == [4, 64]
    assert table.schema.field("embedding").type.list_size == 4 * 64


def test_parquet_resume_keeps_rows_and_existing_output_needs_a_flag(
    model_dir, images, tmp_path, small_parts
):
    out = tmp_path / "features"
    embed_small(model_dir, out, images[:3], format="parquet")
    with pytest.raises(UserError, match="already exists: add --resume"):
        embed_small(model_dir, out, images, format="parquet")
    with pytest.raises(UserError, match="written with pool='cls'"):
        embed_small(model_dir, out, images, format="parquet", pool="mean", resume=True)
    before = _table(out)
    resumed = embed_small(model_dir, out, images, format="parquet", resume=True)
    assert resumed.rows == 5
    table = _table(out)
    assert table.column("path").to_pylist() == [str(p) for p in images[:5]]
    assert table.slice(0, 3).column("embedding").equals(before.column("embedding"))
    assert embed_small(model_dir, out, images[:2], format="parquet", overwrite=True).rows == 2
    assert _table(out).num_rows == 2
    assert not out.with_suffix(".partial").exists()


def test_a_killed_part_write_leaves_no_half_part_and_resume_finishes(
    model_dir, images, tmp_path, small_parts, monkeypatch
):
    out = tmp_path / "features"
    real_replace = sinks.os.replace

    def killed(source, target):
        if Path(target).name == "part-00001.parquet":
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(sinks.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        embed_small(model_dir, out, images, format="parquet")
    monkeypatch.setattr(sinks.os, "replace", real_replace)
    parts = out.with_suffix(".partial") / "parquet"
    assert [p.name for p in parts.glob("part-*")] == ["part-00000.parquet"]
    assert not out.exists()
    assert embed_small(model_dir, out, images, format="parquet", resume=True).rows == 5
    assert _table(out).num_rows == 5


def test_parquet_refuses_a_npy_out_and_a_file_in_its_place(model_dir, images, tmp_path):
    with pytest.raises(UserError, match="names a folder"):
        embed_small(model_dir, tmp_path / "x.npy", images, format="parquet")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="it is a file"):
        embed_small(model_dir, tmp_path / "file", images, format="parquet")


@pytest.mark.parametrize("count", [1, 2, 3, 7])
@pytest.mark.parametrize("shards", [1, 2, 3, 5])
def test_shards_split_the_listing_without_overlap_or_gap(count, shards):
    paths = [f"p{i}" for i in range(count)]
    split = [shard_of(paths, shards, index) for index in range(shards)]
    assert [p for shard in split for p in shard] == paths
    assert max(map(len, split)) - min(map(len, split)) <= 1


def test_shard_index_must_be_below_the_count(model_dir, images, tmp_path):
    with pytest.raises(UserError, match="--shard-index must be from 0 to"):
        embed_small(model_dir, tmp_path / "f.npy", images, num_shards=2, shard_index=2)


def _shards(model: Path, folder: Path, inputs: list[Path], count: int, **options) -> list[Path]:
    suffix = ".npy" if options.get("format", "npy") == "npy" else ""
    outs = [folder / f"shard{index}{suffix}" for index in range(count)]
    for index, out in enumerate(outs):
        embed_small(model, out, inputs, num_shards=count, shard_index=index, **options)
    return outs


@pytest.mark.parametrize("format", ["npy", "parquet"])
def test_merged_shards_are_the_unsharded_run(model_dir, images, tmp_path, small_parts, format):
    from dinov2_fast.embedding.merge import merge_outputs

    suffix = ".npy" if format == "npy" else ""
    whole = tmp_path / f"whole{suffix}"
    # One image per batch: a batch's size changes the CPU's float sums in the last bits.
    embed_small(model_dir, whole, [images[0].parent], format=format, batch_size=1)
    shards = _shards(model_dir, tmp_path, [images[0].parent], 3, format=format, batch_size=1)
    assert _manifest(shards[1])["shard"] == [1, 3]
    merged = tmp_path / f"merged{suffix}"
    result = merge_outputs(merged, shards[::-1])
    assert (result.rows, result.skipped) == (5, 1)
    expected, got = _manifest(whole), _manifest(merged)
    for manifest in (expected, got):
        manifest.pop("features")
    assert got == expected
    if format == "npy":
        np.testing.assert_array_equal(np.load(merged), np.load(whole))
    else:
        assert _table(merged).equals(_table(whole))
        assert _table(merged).schema.metadata == _table(whole).schema.metadata


@pytest.mark.parametrize("format", ["npy", "parquet"])
def test_a_shard_with_no_inputs_is_an_empty_output_that_merges(model_dir, images, tmp_path, format):
    from dinov2_fast.embedding.merge import merge_outputs

    shards = _shards(model_dir, tmp_path, images[:2], 3, format=format)
    assert _manifest(shards[0])["inputs"] == []  # 2 inputs in 3 shards: the first has none
    if format == "npy":
        assert np.load(shards[0]).shape == (0, 64)
    else:
        assert _table(shards[0]).num_rows == 0 and _table(shards[0]).schema.names[:2] == [
            "path",
            "embedding",
        ]
    result = merge_outputs(tmp_path / f"merged{'.npy' if format == 'npy' else ''}", shards)
    assert (result.rows, result.skipped) == (2, 0)


def test_merge_refuses_missing_repeated_mixed_and_unsharded_outputs(
    model_dir, images, tmp_path, capsys
):
    from dinov2_fast.cli import main

    shards = _shards(model_dir, tmp_path, images, 3)
    mean = tmp_path / "mean"
    mean.mkdir()
    other = _shards(model_dir, mean, images, 3, pool="mean")
    reordered = tmp_path / "reordered.npy"
    embed_small(model_dir, reordered, images[::-1], num_shards=3, shard_index=0)  # img5, img4
    whole = tmp_path / "whole.npy"
    embed_small(model_dir, whole, images)
    capsys.readouterr()
    cases = [
        (shards[:2], "shard 2 of 3 is missing"),
        ([*shards, shards[1]], "are both shard 1 of 3"),
        ([shards[0], shards[1], other[2]], "written with pool='mean' and 'cls'"),
        ([reordered, shards[1], shards[2]], f"{str(images[4])!r} is in both"),
        ([whole], "is not a shard (embedded without --num-shards)"),
        ([tmp_path / "nothing.npy"], "is no finished embed output"),
    ]
    for given, message in cases:
        assert main(["merge", str(tmp_path / "merged.npy"), *map(str, given)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "merged.npy").exists()
    assert main(["merge", str(tmp_path / "merged.npy"), *map(str, shards)]) == 0
    assert "(5 x 64, float32)" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "merged.npy"), *map(str, shards)]) == 2
    assert "already exists: add --overwrite" in capsys.readouterr().err


def _reading_examples() -> list[str]:
    """The Python blocks of docs/cli.md's "Reading the outputs"."""
    text = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    section = text.split("**Reading the outputs.**", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]


def test_the_reading_examples_in_the_docs_run(model_dir, images, tmp_path, monkeypatch):
    import importlib.util
    import re

    embed_small(model_dir, tmp_path / "photos.npy", images[:3])
    embed_small(model_dir, tmp_path / "photos-parquet", images[:3], format="parquet")
    monkeypatch.chdir(tmp_path)
    examples = _reading_examples()
    assert len(examples) == 4
    for example in examples:
        modules = re.findall(r"^(?:import|from) (\w+)", example, flags=re.MULTILINE)
        # datasets and autofaiss are not among the test dependencies: run those where present.
        if all(importlib.util.find_spec(module) for module in modules):
            exec(compile(example, "docs/cli.md", "exec"), {})
