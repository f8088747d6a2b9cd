"""The ``.npy`` writer: memory-mapped feature files allocated up front, rows written in place
and copied in chunks, run files replaced whole."""

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

from .._resolve import UserError, quoted

__all__ = [
    "NpyRows",
    "check_space",
    "copy_rows",
    "create_array",
    "disk_full_names",
    "write_json",
]

_COPY_CHUNK_BYTES = 64 << 20


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
