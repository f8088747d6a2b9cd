"""One run per ``--out`` at a time: an exclusive ``flock`` held for the whole run.

The lock file ``FEATURES.lock`` sits beside the output and names the process holding it. The
kernel drops a ``flock`` when its process dies, however it dies, so a lock file left by a
killed run is stale by construction: the next run takes it over, and says so.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from .._resolve import UserError, quoted

__all__ = ["RunLock"]


def _holder_text(path: Path) -> str:
    """Who wrote the lock file, as the error names them."""
    try:
        holder = json.loads(path.read_text())
        return f"process {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class RunLock:
    """Held from ``acquire`` to ``release``; a second run on the same ``--out`` is refused."""

    def __init__(self, out: Path) -> None:
        self.path = out.with_suffix(".lock")
        self._out = out
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(
                    f"another embed is writing {quoted(self._out)} "
                    f"({_holder_text(self.path)}): wait for it to end or stop it, "
                    "or write to another --out"
                ) from None
            # The holder before us may have removed the file between our open and our
            # lock: a lock on a file no longer at the path guards nothing, so start again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = os.fstat(fd).st_size > 0
        if stale:
            print(
                f"taking over the lock of a run that ended without releasing it "
                f"({_holder_text(self.path)})",
                file=sys.stderr,
            )
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        # Removed while still held, so no run can lock the file on its way out.
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
