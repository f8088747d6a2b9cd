"""``embed --crop none`` and ``--max-tokens``: images at their own aspect ratio, batches cut by
a token budget, ragged ``patch`` rows through the run's storage, resume, merge and the docs'
reading code. In-process runs of a tiny random-weight model on 28-pixel shortest edges."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import dinov2_fast
from dinov2_fast._resolve import UserError
from dinov2_fast.embedding import embed, manifest_path, ragged
from dinov2_fast.embedding.engine import cut_batches
from dinov2_fast.embedding.preprocess import normalize, resize_pixels
from tests._embedding import embed_small
from tests._models import hf_model

# Every one resizes to a grid of its own (shortest edge 28, sides floored to 14): a batch of
# several is a list, never a stacked tensor, so rows must equal each image run alone exactly.
_SIZES = [(36, 36), (32, 48), (30, 90), (90, 30), (48, 32), (30, 60), (30, 75)]
_GRIDS = [(2, 2), (2, 3), (2, 6), (6, 2), (3, 2), (2, 4), (2, 5)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    hf_model().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(model_dir: Path) -> torch.nn.Module:
    return dinov2_fast.Dinov2Model.from_pretrained(model_dir, backend="torch").eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for index, (height, width) in enumerate(_SIZES):
        path = folder / f"img{index}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def alone(model: torch.nn.Module, images: list[Path]) -> list[tuple[torch.Tensor, ...]]:
    """Per image, run alone on its preprocessed pixels: (pooler, patches as (h, w, D))."""
    rows = []
    with torch.inference_mode():
        for path in images:
            pixels = normalize(torch.from_numpy(resize_pixels(Image.open(path), 28, 14)))
            output = model(pixel_values=pixels[None])
            height, width = pixels.shape[1] // 14, pixels.shape[2] // 14
            rows.append(
                (
                    output.pooler_output[0],
                    output.last_hidden_state[0, 1:].unflatten(0, (height, width)),
                )
            )
    return rows


def test_uncropped_pixels_are_transformers_uncropped_floored_to_the_patch(images):
    processor = transformers.BitImageProcessorPil(
        size={"shortest_edge": 28}, do_center_crop=False, do_rescale=False, do_normalize=False
    )
    for path, (height, width), grid in zip(images, _SIZES, _GRIDS, strict=True):
        pixels = resize_pixels(Image.open(path), 28, 14)
        assert pixels.shape == (3, grid[0] * 14, grid[1] * 14)
        # Aspect kept: within the floor (under a patch) of the resized long edge.
        resized = processor(Image.open(path), return_tensors="np")["pixel_values"][0]
        assert abs(resized.shape[1] / resized.shape[2] - height / width) < 0.05
        assert min(resized.shape[1:]) == 28
        np.testing.assert_array_equal(pixels, resized[:, : pixels.shape[1], : pixels.shape[2]])


def test_cut_batches_respects_both_limits():
    assert cut_batches([5, 7, 5, 13, 1], 13, None) == [[0, 1], [2], [3], [4]]
    assert cut_batches([5, 7, 5, 13, 1], None, 2) == [[0, 1], [2, 3], [4]]
    assert cut_batches([20, 1], 13, None) == [[0], [1]]


@pytest.mark.parametrize("order", ["given", "reversed"])
def test_max_tokens_batches_stay_in_budget_and_rows_in_input_order(model, images, alone, order):
    indices = list(range(len(images))) if order == "given" else list(range(len(images)))[::-1]
    batches = []
    forward = model.forward

    def spy(pixel_values, **kwargs):
        sizes = [tuple(image.shape[-2:]) for image in pixel_values]
        batches.append(sum(1 + (h // 14) * (w // 14) for h, w in sizes))
        return forward(pixel_values=pixel_values, **kwargs)

    model.forward = spy
    try:
        pooled = embed(
            [images[i] for i in indices], model, crop="none", crop_size=28, max_tokens=16
        )
        grids = embed(
            [images[i] for i in indices],
            model,
            crop="none",
            crop_size=28,
            pool="patch",
            max_tokens=16,
        )
    finally:
        del model.forward
    assert batches and max(batches) <= 16
    assert len(batches) < 2 * len(images)  # several images share batches
    for row, index in enumerate(indices):
        torch.testing.assert_close(pooled[row], alone[index][0], rtol=0, atol=0)
        torch.testing.assert_close(grids[row], alone[index][1], rtol=0, atol=0)


def test_a_window_of_many_images_is_cut_by_size_within_the_budget(model, images, alone):
    # Three of each, shuffled: more than a window (8 budgets), so batches are cut from it
    # as it refills, same-size images meet and run stacked.
    order = np.random.default_rng(2).permutation(3 * len(images)) % len(images)
    calls = []
    forward = model.forward

    def spy(pixel_values, **kwargs):
        sizes = [tuple(image.shape[-2:]) for image in pixel_values]
        calls.append(
            (isinstance(pixel_values, list), sum(1 + (h // 14) * (w // 14) for h, w in sizes))
        )
        return forward(pixel_values=pixel_values, **kwargs)

    model.forward = spy
    try:
        pooled = embed([images[i] for i in order], model, crop="none", crop_size=28, max_tokens=16)
    finally:
        del model.forward
    assert max(tokens for _, tokens in calls) <= 16
    assert any(not is_list for is_list, _ in calls)  # some batches of one size
    for row, index in enumerate(order):
        torch.testing.assert_close(pooled[row], alone[index][0], rtol=1e-5, atol=1e-5)


def test_an_image_over_the_budget_is_skipped_with_the_reason(model_dir, images, tmp_path, capsys):
    out = tmp_path / "features.npy"
    result = embed_small(model_dir, out, images[:3], crop="none", max_tokens=9)
    assert result.rows == 2
    skipped = json.loads(manifest_path(out).read_text())["skipped"]
    reason = "resized to 28x84 it takes 13 tokens, more than --max-tokens 9"
    assert skipped == [{"path": str(images[2]), "reason": reason}]
    assert reason in capsys.readouterr().err


def test_the_run_writes_uncropped_rows_in_input_order(model_dir, images, alone, tmp_path):
    out = tmp_path / "features.npy"
    inputs = images[::-1]
    embed_small(model_dir, out, inputs, crop="none", pool="cls+mean", max_tokens=20)
    features = np.load(out)
    manifest = json.loads(out.with_suffix(".manifest.json").read_text())
    assert manifest["inputs"] == [str(p) for p in inputs]
    assert manifest["crop"] == "none" and manifest["resize_size"] == 28
    for row, path in enumerate(inputs):
        cls, patches = alone[images.index(path)]
        np.testing.assert_array_equal(features[row, :64], cls.numpy())
        np.testing.assert_array_equal(features[row, 64:], patches.mean(dim=(0, 1)).numpy())


def _ragged_examples() -> list[str]:
    """The Python blocks of docs/cli.md's "Uncropped images" paragraph."""
    text = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    section = text.split("**Uncropped images", 1)[1].split("**Reading the outputs.**", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]


def _read_with_the_docs(example: str, folder: Path, monkeypatch) -> dict[str, np.ndarray]:
    monkeypatch.chdir(folder)
    namespace: dict = {}
    exec(compile(example, "docs/cli.md", "exec"), namespace)
    return namespace["grids"]


@pytest.mark.parametrize("output", ["npy", "parquet"])
def test_ragged_patches_round_trip_through_the_documented_reading(
    model_dir, images, alone, tmp_path, monkeypatch, output
):
    out = tmp_path / ("photos.npy" if output == "npy" else "photos-parquet")
    embed_small(model_dir, out, images, crop="none", pool="patch", max_tokens=20, format=output)
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["feature_shape"] == [None, 64]
    assert manifest["shape"] == [sum(h * w for h, w in _GRIDS), 64]
    if output == "npy":
        assert manifest["patch_grids"] == [list(g) for g in _GRIDS]
        assert (
            manifest["patch_offsets"] == np.cumsum([0] + [h * w for h, w in _GRIDS[:-1]]).tolist()
        )
    example = _ragged_examples()[0 if output == "npy" else 1]
    grids = _read_with_the_docs(example, tmp_path, monkeypatch)
    assert list(grids) == [str(p) for p in images]
    for path, (_, patches) in zip(images, alone, strict=True):
        np.testing.assert_array_equal(grids[str(path)], patches.numpy())


def _expected_grids(images: list[Path], alone, inputs: list[Path]) -> list[np.ndarray]:
    return [alone[images.index(path)][1].numpy() for path in inputs]


def _npy_grids(out: Path) -> list[np.ndarray]:
    manifest = json.loads(out.with_suffix(".manifest.json").read_text())
    flat = np.load(out)
    return [
        flat[first : first + h * w].reshape(h, w, -1)
        for first, (h, w) in zip(manifest["patch_offsets"], manifest["patch_grids"], strict=True)
    ]


def test_resume_after_an_interrupted_ragged_run_redoes_only_the_cut_rows(
    model_dir, images, alone, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "features.npy"
    write_chunk = ragged._write_chunk
    calls = []

    def cut(chunks, chunk, values):
        # The second batch's chunk lands whole, then the run dies before its rows are marked.
        write_chunk(chunks, chunk, values)
        calls.append(chunk)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ragged, "_write_chunk", cut)
    with pytest.raises(KeyboardInterrupt):
        embed_small(model_dir, out, images, crop="none", pool="patch", max_tokens=16)
    monkeypatch.undo()
    partial = out.with_suffix(".partial")
    status = np.load(partial / "status.npy")
    done = int((status == 1).sum())
    assert 0 < done < len(images)
    assert len(list((partial / "chunks").glob("*.npy"))) == 2  # one of them no row points into
    capsys.readouterr()
    embed_small(model_dir, out, images, crop="none", pool="patch", max_tokens=16, resume=True)
    assert f"resuming: {done} of {len(images)} rows already written" in capsys.readouterr().err
    for got, expected in zip(_npy_grids(out), _expected_grids(images, alone, images), strict=True):
        np.testing.assert_array_equal(got, expected)
    assert not partial.exists()


@pytest.mark.parametrize("output", ["npy", "parquet"])
def test_resume_extends_a_finished_ragged_output_keeping_its_rows(
    model_dir, images, alone, tmp_path, output
):
    out = tmp_path / ("features.npy" if output == "npy" else "features")
    options = {"crop": "none", "pool": "patch", "format": output}
    embed_small(model_dir, out, images[:3], **options)
    # The kept rows are read back from the output, not computed again.
    computed = []
    write = ragged.RaggedRows.write

    def counted(self, rows, grids):
        computed.extend(rows)
        write(self, rows, grids)

    inputs = [images[5], *images[:3], images[4]]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ragged.RaggedRows, "write", counted)
        embed_small(model_dir, out, inputs, resume=True, **options)
    assert sorted(computed) == [0, 4]
    if output == "npy":
        got = _npy_grids(out)
    else:
        import pyarrow.dataset

        rows = pyarrow.dataset.dataset(out, format="parquet").to_table().to_pylist()
        assert [row["path"] for row in rows] == [str(p) for p in inputs]
        got = [
            np.array(r["embedding"], np.float32).reshape(r["grid_h"], r["grid_w"], -1) for r in rows
        ]
    for grid, expected in zip(got, _expected_grids(images, alone, inputs), strict=True):
        np.testing.assert_array_equal(grid, expected)


@pytest.mark.parametrize("output", ["npy", "parquet"])
def test_merge_joins_ragged_shards_as_the_unsharded_run(model_dir, images, tmp_path, output):
    from dinov2_fast.embedding.merge import merge_outputs

    suffix = ".npy" if output == "npy" else ""
    options = {"crop": "none", "pool": "patch", "format": output}
    whole = tmp_path / f"whole{suffix}"
    embed_small(model_dir, whole, images, **options)
    shards = [tmp_path / f"shard{i}{suffix}" for i in range(2)]
    for index, shard in enumerate(shards):
        embed_small(model_dir, shard, images, num_shards=2, shard_index=index, **options)
    merged = tmp_path / f"merged{suffix}"
    assert merge_outputs(merged, shards[::-1]).rows == len(images)  # rows, not patches
    drop = ("features", "shard")

    def manifest(path: Path) -> dict:
        return {
            k: v for k, v in json.loads(manifest_path(path).read_text()).items() if k not in drop
        }

    assert manifest(merged) == manifest(whole)
    if output == "npy":
        np.testing.assert_array_equal(np.load(merged), np.load(whole))
    else:
        import pyarrow.dataset

        def rows(path: Path) -> list[dict]:
            return pyarrow.dataset.dataset(path, format="parquet").to_table().to_pylist()

        assert rows(merged) == rows(whole)


def test_fast_decode_works_uncropped(model_dir, tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 90, 3), np.uint8)).save(path)
    out = tmp_path / "features.npy"
    embed_small(model_dir, out, [path], crop="none", pool="patch", decode="fast")
    assert json.loads(out.with_suffix(".manifest.json").read_text())["patch_grids"] == [[2, 2]]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-tokens", "0"], "argument --max-tokens: 0 is below the minimum, 1"),
        (["--crop", "bogus"], "argument --crop: invalid choice: 'bogus'"),
        (["--max-tokens", "4"], "--max-tokens 4 holds no image: one 28x28 image takes 5 tokens"),
    ],
)
def test_bad_values_are_one_line_errors(model_dir, images, tmp_path, capsys, extra, message):
    from dinov2_fast.cli import main

    args = ["embed", str(images[0]), "--model", str(model_dir), "--out", str(tmp_path / "x.npy")]
    try:
        status = main([*args, "--size", "28", "--device", "cpu", "--workers", "0", *extra])
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.npy").exists()


def test_bad_values_from_python_are_clear_errors(model_dir, model, images, tmp_path):
    with pytest.raises(UserError, match="--crop must be one of center, none, got 'bogus'"):
        embed_small(model_dir, tmp_path / "y.npy", images, crop="bogus")
    with pytest.raises(ValueError, match="max_tokens must be at least 1, got 0"):
        embed(images, model, crop="none", max_tokens=0)
    with pytest.raises(ValueError, match="--crop must be one of"):
        embed(images, model, crop="bogus")
    with pytest.raises(ValueError, match="only dinov2_fast's models"):
        embed(images, hf_model(), crop="none", crop_size=28)


def test_an_output_written_before_crop_was_recorded_resumes_as_a_centre_crop(
    model_dir, images, tmp_path
):
    out = tmp_path / "features.npy"
    embed_small(model_dir, out, images[:2])
    manifest = json.loads(manifest_path(out).read_text())
    del manifest["crop"]
    manifest_path(out).write_text(json.dumps(manifest))
    result = embed_small(model_dir, out, images[:3], resume=True)
    assert np.load(out).shape[0] == 3 and result.rows == 3
    with pytest.raises(UserError, match="written with crop='center'"):
        embed_small(model_dir, out, images[:3], resume=True, crop="none")


def test_the_ray_engine_refuses_uncropped_images_and_token_budgets(model_dir, images, tmp_path):
    out = tmp_path / "features"
    with pytest.raises(UserError, match="--engine ray embeds centre crops.*drop --crop none"):
        embed_small(model_dir, out, images, engine="ray", format="parquet", crop="none")
    with pytest.raises(UserError, match="drop --max-tokens"):
        embed_small(model_dir, out, images, engine="ray", format="parquet", max_tokens=64)
    assert not out.exists()


def test_shards_written_before_crop_was_recorded_merge_with_new_ones(model_dir, images, tmp_path):
    from dinov2_fast.embedding.merge import merge_outputs

    shards = [tmp_path / f"shard{i}.npy" for i in range(2)]
    for index, shard in enumerate(shards):
        embed_small(model_dir, shard, images[:4], num_shards=2, shard_index=index)
    manifest = json.loads(manifest_path(shards[0]).read_text())
    del manifest["crop"]
    manifest_path(shards[0]).write_text(json.dumps(manifest))
    assert merge_outputs(tmp_path / "merged.npy", shards).rows == 4
