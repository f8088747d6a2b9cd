"""Ragged rows: the ``patch`` pool of uncropped images (``--crop none``), each input its own
``(h, w)`` grid of ``D``-wide patch features, so rows differ in length.

Stored while running (the runner's partial folder): ``features.npy`` holds per input where
its patches are, ``[chunk, first, h, w]`` (int64, ``INDEX_FIELDS``), and each batch's
patches go whole into ``chunks/CHUNK.npy``, ``(patches, D)``, written under a hidden name
and renamed before the batch's index rows and status bytes are set. So a killed run leaves
complete chunks only, rows marked done point into them, and a chunk no done row points to
(its batch cut short) is never read. Chunk numbers are drawn at random (62 bits), so a batch
redone after an interruption never replaces a chunk that rows marked done still point into;
chunk 0 is the rows a resume keeps from a finished output.

Stored when finished: npy, one flat ``(total_patches, D)`` array in row order with each
row's first patch and grid in the manifest (``patch_offsets``, ``patch_grids``); Parquet,
one row per input with ``embedding`` a ``list<fixed_size_list<float32>[D]>`` of its patches
(row-major over the grid) and ``grid_h``, ``grid_w`` columns.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._resolve import quoted
from .engine import cut_batches
from .sinks import OutputFormat, check_space, create_array, disk_full_names

__all__ = [
    "INDEX_FIELDS",
    "RaggedRows",
    "copy_chunks",
    "done_chunks",
    "is_ragged",
    "join_npy",
    "read_output",
    "write_output",
]

INDEX_FIELDS = ("chunk", "first", "h", "w")
_KEPT_CHUNK = 0
# Patch rows per Parquet part, at most (about 128 MiB of float32 at D = 1024).
_PART_PATCHES = 1 << 15
# Chunks kept open at once while a finish reads rows back.
_OPEN_CHUNKS = 64


def is_ragged(settings: dict[str, Any]) -> bool:
    """Rows of different lengths: a run (or output) of ``feature_shape`` ``[None, D]``."""
    return settings["feature_shape"][0] is None


def _chunk_path(chunks: Path, chunk: int) -> Path:
    return chunks / f"{chunk:016x}.npy"


def _write_chunk(chunks: Path, chunk: int, values: np.ndarray) -> None:
    """A chunk whole, or not at all: a killed write leaves only the hidden staging file."""
    path = _chunk_path(chunks, chunk)
    staging = chunks / f".{path.name}.tmp"
    with disk_full_names(path), open(staging, "wb") as file:
        np.save(file, values)
    os.replace(staging, path)


class RaggedRows:
    """``NpyRows`` for ragged rows: ``write`` takes each row's ``(h, w, D)`` grid."""

    def __init__(self, partial: Path) -> None:
        self._index = np.load(partial / "features.npy", mmap_mode="r+")
        self._chunks = partial / "chunks"
        settings = json.loads((partial / "run.json").read_text())["settings"]
        self._dtype = getattr(torch, settings["features_dtype"])

    def write(self, rows: list[int], grids: list[torch.Tensor]) -> None:
        values = torch.cat([grid.reshape(-1, grid.shape[-1]) for grid in grids])
        chunk = secrets.randbits(62) or 1
        _write_chunk(self._chunks, chunk, values.to(self._dtype).cpu().numpy())
        sizes = [grid.shape[0] * grid.shape[1] for grid in grids]
        first = np.cumsum([0, *sizes[:-1]])
        shapes = [grid.shape[:2] for grid in grids]
        self._index[rows] = [[chunk, f, h, w] for f, (h, w) in zip(first, shapes, strict=True)]

    def flush(self) -> None:
        self._index.flush()


def done_chunks(partial: Path, index: np.ndarray, done: np.ndarray) -> dict[int, Path]:
    """The chunk files the done rows of an unfinished run point into."""
    return {int(c): _chunk_path(partial / "chunks", int(c)) for c in np.unique(index[done, 0])}


def copy_chunks(chunks: dict[int, Path | np.ndarray], folder: Path) -> None:
    """A new run's ``chunks/``, holding the kept rows' ``chunks`` (files, or arrays)."""
    folder.mkdir()
    for chunk, source in chunks.items():
        if isinstance(source, Path):
            with disk_full_names(folder):
                shutil.copyfile(source, _chunk_path(folder, chunk))
        else:
            _write_chunk(folder, chunk, source)


def _rows(partial: Path, index: np.ndarray, rows: np.ndarray) -> Iterator[np.ndarray]:
    """The ``(patches, D)`` of each of ``rows``, read back from the chunks."""

    @functools.lru_cache(maxsize=_OPEN_CHUNKS)
    def chunk(number: int) -> np.ndarray:
        return np.load(_chunk_path(partial / "chunks", number), mmap_mode="r")

    for row in rows:
        number, first, height, width = (int(v) for v in index[row])
        yield chunk(number)[first : first + height * width]


def _parquet_table(output: Any, settings: dict[str, Any], paths, values, grids):
    import pyarrow as pa

    width = settings["feature_shape"][1]
    patches = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)
    counts = [h * w for h, w in grids]
    offsets = pa.array(np.cumsum([0, *counts]), pa.int32())
    columns = [
        pa.array(paths, pa.string()),
        pa.ListArray.from_arrays(offsets, patches),
        pa.array([h for h, _ in grids], pa.int32()),
        pa.array([w for _, w in grids], pa.int32()),
    ]
    return pa.Table.from_arrays(columns, schema=output.schema(settings))


def write_output(
    output: OutputFormat,
    partial: Path,
    index: np.ndarray,
    rows: np.ndarray,
    inputs: list[str],
    settings: dict[str, Any],
) -> tuple[str, dict[str, Any]]:
    """The finish of a ragged run: ``rows`` written in ``output``'s format in ``partial``,
    under the name returned, with the manifest's fields for them."""
    grids = [(int(index[r, 2]), int(index[r, 3])) for r in rows]
    counts = np.array([h * w for h, w in grids], dtype=np.int64)
    width = settings["feature_shape"][1]
    fields: dict[str, Any] = {"shape": [int(counts.sum()), width]}
    if output.name == "npy":
        ready = partial / "compact.npy"
        dtype = np.dtype(settings["features_dtype"])
        what = f"the {len(rows)} rows read (free some, then rerun with --resume)"
        check_space(ready, int(counts.sum()) * width * dtype.itemsize, what)
        flat = create_array(ready, dtype, (int(counts.sum()), width), what)
        offsets = (np.cumsum(counts) - counts).astype(np.int64)
        for start, values in zip(offsets, _rows(partial, index, rows), strict=True):
            flat[start : start + len(values)] = values
        flat.flush()
        fields |= {"patch_offsets": offsets.tolist(), "patch_grids": [list(g) for g in grids]}
        return ready.name, fields
    ready = partial / "parquet"
    shutil.rmtree(ready, ignore_errors=True)  # an earlier finish cut short
    ready.mkdir()
    # No rows still get one (empty) part: a reader finds the schema in it.
    parts = cut_batches(counts.tolist(), _PART_PATCHES, None) or [[]]
    for number, positions in enumerate(parts):
        part = rows[positions]
        values = np.zeros((0, width), np.float32)
        if len(part):
            values = np.concatenate(list(_rows(partial, index, part))).astype(np.float32)
        paths = [inputs[r] for r in part]
        table = _parquet_table(output, settings, paths, values, [grids[p] for p in positions])
        output.write_part(ready, number, table)
    return ready.name, fields


def read_output(
    format_name: str, out: Path, manifest: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """A finished ragged output as a run's index (rows in the manifest's input order, all in
    chunk 0) and that chunk's ``(patches, D)``. Raises OSError or ValueError for an output
    that cannot be read."""
    inputs = manifest["inputs"]
    if format_name == "npy":
        flat = np.load(out, mmap_mode="r")
        offsets, grids = manifest.get("patch_offsets"), manifest.get("patch_grids")
        if not (isinstance(offsets, list) and isinstance(grids, list)):
            raise ValueError("its manifest has no patch_offsets and patch_grids")
        if not len(offsets) == len(grids) == len(inputs):
            raise ValueError("its manifest's patch_offsets and patch_grids are not one per input")
        index = [[_KEPT_CHUNK, first, h, w] for first, (h, w) in zip(offsets, grids, strict=True)]
        index = np.array(index, dtype=np.int64).reshape(-1, len(INDEX_FIELDS))
        if len(index) and (index[:, 1] + index[:, 2] * index[:, 3]).max() > len(flat):
            raise ValueError(f"{quoted(out)} has fewer patches than its manifest's grids")
        return index, flat
    import pyarrow as pa
    import pyarrow.dataset

    try:
        table = pyarrow.dataset.dataset(out, format="parquet").to_table()
        paths = table.column("path").to_pylist()
        embedding = table.column("embedding").combine_chunks()
        flat = embedding.flatten().flatten().to_numpy()
        heights = table.column("grid_h").to_numpy()
        widths = table.column("grid_w").to_numpy()
    except (pa.ArrowException, KeyError) as err:
        raise ValueError(str(err).splitlines()[0]) from None
    if sorted(paths) != sorted(inputs):
        raise ValueError("its rows are not the inputs its manifest lists")
    width = manifest["feature_shape"][1]
    counts = heights.astype(np.int64) * widths
    first = np.cumsum([0, *counts[:-1]]).astype(np.int64)
    position = {path: row for row, path in enumerate(paths)}
    order = [position[path] for path in inputs]
    index = np.stack([np.zeros_like(first), first, heights, widths], axis=1)[order]
    return index.astype(np.int64), flat.reshape(-1, width)


def join_npy(
    folder: Path, outputs: list[Path], manifests: list[dict[str, Any]], settings: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """``merge`` of ragged npy shards: their flat arrays one after the other, each shard's
    ``patch_offsets`` moved by the patches before it. Raises ValueError naming a shard whose
    patches are not its manifest's."""
    arrays = []
    offsets: list[int] = []
    grids: list[list[int]] = []
    for path, manifest in zip(outputs, manifests, strict=True):
        index, flat = read_output("npy", path, manifest)
        expected = int((index[:, 2] * index[:, 3]).sum())
        if expected != len(flat):
            raise ValueError(
                f"{quoted(path)} holds {len(flat)} patches, its manifest's grids {expected}"
            )
        before = sum(map(len, arrays))
        offsets += (index[:, 1] + before).tolist()
        grids += index[:, 2:].tolist()
        arrays.append(flat)
    ready = folder / "features.npy"
    total = sum(map(len, arrays))
    width = settings["feature_shape"][1]
    what = f"{total} patches of features"
    check_space(ready, sum(array.nbytes for array in arrays), what)
    joined = create_array(ready, settings["features_dtype"], (total, width), what)
    start = 0
    for array in arrays:
        joined[start : start + len(array)] = array
        start += len(array)
    joined.flush()
    return ready.name, {"shape": [total, width], "patch_offsets": offsets, "patch_grids": grids}
