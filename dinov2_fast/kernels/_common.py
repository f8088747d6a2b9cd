"""What every kernel file shares: launch accounting and the ahead-of-time compile spec."""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# Every launcher calls record_launch(name) once per kernel launch, so tests can prove the
# Triton path ran and no silent fallback to the reference took its place.
_LAUNCHES: collections.Counter[str] = collections.Counter()


def record_launch(name: str) -> None:
    _LAUNCHES[name] += 1


@contextlib.contextmanager
def count_launches() -> Iterator[collections.Counter[str]]:
    """Yield a Counter of Triton launches (kernel name -> count) made inside the block."""
    counts: collections.Counter[str] = collections.Counter()
    before = _LAUNCHES.copy()
    try:
        yield counts
    finally:
        counts.update(_LAUNCHES - before)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class KernelSpec:
    """One compile of one kernel for the ahead-of-time report (kernels/report.py).

    signature maps every runtime argument name to its Triton type ("*fp16", "i32", "fp32", ...);
    constexprs maps every constexpr argument name to its value.
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    label: str
    extra: dict[str, Any] = field(default_factory=dict)
