"""Writing features: the run's rows in a preallocated memory-mapped ``.npy`` (written in
place, copied in chunks), run files replaced whole, and the two output formats a finished run
is written in, one interface (``OutputFormat``): a ``.npy`` file, or a folder of Parquet
parts."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._resolve import UserError, first_line, quoted

__all__ = [
    "FORMATS",
    "NpyRows",
    "OutputFormat",
    "check_space",
    "copy_rows",
    "create_array",
    "disk_full_names",
    "write_json",
]

_COPY_CHUNK_BYTES = 64 << 20
# Rows per Parquet part: parts of about this size read well in parallel (and stay small
# enough that a reader holds one in memory).
_PART_BYTES = 128 << 20


class NpyRows:
    """The rows of a preallocated features ``.npy``, written in place through a shared memory
    map (each torchrun rank writes its own rows of the same file)."""

    def __init__(self, path: Path) -> None:
        self._features = np.load(path, mmap_mode="r+")
        self._dtype = getattr(torch, str(self._features.dtype))

    def write(self, rows: list[int], values: torch.Tensor) -> None:
        self._features[rows] = values.to(self._dtype).cpu().numpy()

    def flush(self) -> None:
        self._features.flush()


def copy_rows(
    source: np.ndarray, source_rows: np.ndarray, target: np.ndarray, target_rows: np.ndarray
) -> None:
    row_bytes = max(1, source[:1].nbytes)
    step = max(1, _COPY_CHUNK_BYTES // row_bytes)
    for start in range(0, len(source_rows), step):
        chunk = slice(start, start + step)
        target[target_rows[chunk]] = source[source_rows[chunk]]


@contextlib.contextmanager
def disk_full_names(path: Path) -> Iterator[None]:
    """A full disk while writing ``path`` becomes a one-line error naming it."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UserError(
            f"no space left on the device to write {quoted(path)}: free some, then rerun "
            "with --resume to continue"
        ) from None


def write_json(path: Path, value: Any) -> None:
    """Replace ``path`` with ``value`` as JSON, never leaving it half written."""
    staging = path.with_name(path.name + ".tmp")
    with disk_full_names(path):
        staging.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(staging, path)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def check_space(path: Path, needed: int, what: str) -> None:
    """Refuse to start writing ``path`` (``what``, ``needed`` bytes) on a disk without room."""
    folder = next(p for p in path.parents if p.exists())
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UserError(
            f"not enough disk space to write {quoted(path)} for {what}: {_size(needed)} "
            f"needed, {_size(free)} free"
        )


def create_array(path: Path, dtype: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A new ``.npy`` memory map whose disk blocks are allocated now.

    A memory map over a sparse file takes its blocks as pages are written, and a full disk
    then kills the process with SIGBUS; allocating up front makes it an error here instead.
    """
    with disk_full_names(path):
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    if hasattr(os, "posix_fallocate"):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(
                    f"not enough disk space to write {quoted(path)} for {what}: "
                    f"{_size(os.fstat(fd).st_size)} needed"
                ) from None
            # Filesystems without allocation support keep the disk-usage check only.
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        finally:
            os.close(fd)
    return array


class OutputFormat:
    """How a finished run's features are stored at ``--out``: ``write`` stores rows of the
    run's features into ``folder`` under a name it returns, ``place`` moves that into
    ``out`` (idempotent: a rerun after a crash completes it), ``read`` gives the rows of an
    output back in the order of the manifest's inputs."""

    name: str
    is_folder: bool

    def check_out(self, out: Path) -> None:
        raise NotImplementedError

    def exists(self, out: Path) -> bool:
        return out.is_dir() if self.is_folder else out.is_file()

    def write(
        self,
        folder: Path,
        features: np.ndarray,
        rows: np.ndarray,
        inputs: list[str],
        settings: dict[str, Any],
    ) -> str:
        raise NotImplementedError

    def place(self, ready: Path, out: Path) -> None:
        raise NotImplementedError

    def read(self, out: Path, inputs: list[str], shape: list[int]) -> np.ndarray:
        """Raises OSError or ValueError (the reason) for an output that cannot be read."""
        raise NotImplementedError

    def join(
        self, folder: Path, outputs: list[Path], inputs: list[list[str]], settings: dict[str, Any]
    ) -> str:
        """Store the rows of ``outputs`` (each holding the rows of its ``inputs``), one after
        the other, into ``folder`` under a name it returns, for ``place``. Raises ValueError
        naming an output whose rows are not its inputs."""
        raise NotImplementedError


class _Npy(OutputFormat):
    name = "npy"
    is_folder = False

    def check_out(self, out: Path) -> None:
        if out.suffix.lower() != ".npy":
            raise UserError(f"--out must name a .npy file, got {quoted(out)}")

    def write(self, folder, features, rows, inputs, settings) -> str:
        if len(rows) == len(features):
            return "features.npy"  # every row read: the run's own file is the output
        ready = folder / "compact.npy"
        shape = (len(rows), *features.shape[1:])
        what = f"the {len(rows)} rows read (free some, then rerun with --resume)"
        check_space(ready, features[:1].nbytes * len(rows), what)
        compact = create_array(ready, features.dtype, shape, what)
        copy_rows(features, rows, compact, np.arange(len(rows)))
        compact.flush()
        return ready.name

    def place(self, ready: Path, out: Path) -> None:
        if ready.exists():
            os.replace(ready, out)

    def read(self, out: Path, inputs: list[str], shape: list[int]) -> np.ndarray:
        return np.load(out, mmap_mode="r")

    def join(self, folder, outputs, inputs, settings) -> str:
        arrays = [np.load(path, mmap_mode="r") for path in outputs]
        for path, array, rows in zip(outputs, arrays, inputs, strict=True):
            if len(array) != len(rows):
                raise ValueError(f"{quoted(path)} has {len(array)} rows, its manifest {len(rows)}")
        ready = folder / "features.npy"
        shape = (sum(map(len, arrays)), *settings["feature_shape"])
        what = f"{shape[0]} rows of features"
        check_space(ready, sum(array.nbytes for array in arrays), what)
        joined = create_array(ready, settings["features_dtype"], shape, what)
        start = 0
        for array in arrays:
            rows = np.arange(len(array))
            copy_rows(array, rows, joined, start + rows)
            start += len(array)
        joined.flush()
        return ready.name


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.dataset
        import pyarrow.parquet
    except ImportError:
        raise UserError(
            "--format parquet needs pyarrow (pip install 'dinov2-fast[parquet]')"
        ) from None
    return pyarrow


class _Parquet(OutputFormat):
    """A folder of ``part-NNNNN.parquet`` files, in row order: columns ``path`` (string) and
    ``embedding`` (``fixed_size_list<float32>[D]``, the patch pool flattened), the run's
    settings as JSON under the schema metadata key ``dinov2_fast``. Ragged rows (``ragged``)
    have ``embedding`` ``list<fixed_size_list<float32>[D]>``, one item per patch, and
    ``grid_h``, ``grid_w`` (int32)."""

    name = "parquet"
    is_folder = True
    metadata_key = b"dinov2_fast"

    def check_out(self, out: Path) -> None:
        if out.suffix.lower() == ".npy":
            raise UserError(f"--out of --format parquet names a folder, got {quoted(out)}")
        _pyarrow()

    def schema(self, settings: dict[str, Any]):
        pa = _pyarrow()
        from .. import __version__

        metadata = {**settings, "embedding_shape": settings["feature_shape"]}
        metadata["library_version"] = __version__
        shape = settings["feature_shape"]
        if shape[0] is None:  # ragged: one list of patch vectors per row, and its grid
            fields = [
                ("embedding", pa.list_(pa.list_(pa.float32(), shape[1]))),
                ("grid_h", pa.int32()),
                ("grid_w", pa.int32()),
            ]
        else:
            fields = [("embedding", pa.list_(pa.float32(), int(np.prod(shape))))]
        return pa.schema(
            [("path", pa.string()), *fields], metadata={self.metadata_key: json.dumps(metadata)}
        )

    def table(self, schema, paths: list[str], features: np.ndarray):
        """The rows of ``paths`` with their ``features`` (one row each) in ``schema``."""
        pa = _pyarrow()
        width = schema.field("embedding").type.list_size
        values = np.asarray(features, dtype=np.float32).reshape(-1)
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(values), width)
        return pa.Table.from_arrays([pa.array(paths, pa.string()), embedding], schema=schema)

    def write_part(self, folder: Path, index: int | str, table) -> None:
        """Part ``index`` (``part-INDEX.parquet``, a number zero-padded), written under a
        hidden name first, so that a killed write leaves no half part that a reader would
        take for one, and a rewrite replaces it whole."""
        pq = _pyarrow().parquet
        name = f"{index:05d}" if isinstance(index, int) else index
        part = folder / f"part-{name}.parquet"
        staging = folder / f".{part.name}.{os.getpid()}.tmp"
        with disk_full_names(part):
            pq.write_table(table, staging)
        os.replace(staging, part)

    def write(self, folder, features, rows, inputs, settings) -> str:
        ready = folder / "parquet"
        shutil.rmtree(ready, ignore_errors=True)  # an earlier finish cut short
        ready.mkdir()
        schema = self.schema(settings)
        step = self.part_rows(schema)
        # No rows still get one (empty) part: a reader finds the schema in it.
        for index, start in enumerate(range(0, len(rows), step) or [0]):
            chunk = rows[start : start + step]
            table = self.table(schema, [inputs[r] for r in chunk], features[chunk])
            self.write_part(ready, index, table)
        return ready.name

    def part_rows(self, schema) -> int:
        """Rows per part: about ``_PART_BYTES`` of embeddings."""
        return max(1, _PART_BYTES // (4 * schema.field("embedding").type.list_size))

    def place(self, ready: Path, out: Path) -> None:
        if not ready.exists():
            return
        if out.exists():
            # A folder cannot replace a folder in one step: the old one goes into the run's
            # folder (removed with it), then the new one takes its place.
            os.replace(out, ready.with_name("replaced"))
        os.replace(ready, out)

    def read(self, out: Path, inputs: list[str], shape: list[int]) -> np.ndarray:
        pa = _pyarrow()
        try:
            table = pa.dataset.dataset(out, format="parquet").to_table()
            paths = table.column("path").to_pylist()
            values = table.column("embedding").combine_chunks().flatten().to_numpy()
        except (pa.ArrowException, KeyError) as err:
            raise ValueError(first_line(err)) from None
        if sorted(paths) != sorted(inputs):
            raise ValueError("its rows are not the inputs its manifest lists")
        position = {path: row for row, path in enumerate(paths)}
        return values.reshape(len(paths), *shape)[[position[path] for path in inputs]]

    def join(self, folder, outputs, inputs, settings) -> str:
        pq = _pyarrow().parquet
        ready = folder / "parquet"
        ready.mkdir()
        schema = self.schema(settings)
        index = 0
        for path, rows in zip(outputs, inputs, strict=True):
            paths: list[str] = []
            for part in sorted(path.glob("part-*.parquet")):
                try:
                    table = pq.read_table(part)
                    table = table.cast(schema)
                except (_pyarrow().ArrowException, KeyError) as err:
                    raise ValueError(f"{quoted(part)}: {first_line(err)}") from None
                paths += table.column("path").to_pylist()
                self.write_part(ready, index, table)
                index += 1
            if paths != rows:
                raise ValueError(
                    f"the rows of {quoted(path)} are not the inputs its manifest lists"
                )
        return ready.name


FORMATS: dict[str, OutputFormat] = {"npy": _Npy(), "parquet": _Parquet()}
