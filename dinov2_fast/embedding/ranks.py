"""This process's place under torchrun, and handing rank 0's results to every rank."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as dist

from .._resolve import SharedError, UserError, first_line

__all__ = ["Ranks"]

# Ranks wait for the slowest at the end; torchrun tears the group down if one fails, so
# this only bounds a hang.
_RANK_TIMEOUT = timedelta(hours=6)

_T = TypeVar("_T")


@dataclass(frozen=True)
class Ranks:
    """This process's place under torchrun (one process without it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        machines = world // int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        if machines != 1:
            # Memory maps of one file written from several machines lose rows: network
            # filesystems write whole pages back, over the neighbours' rows.
            raise SharedError(
                f"embed under torchrun runs on one machine; this launch spans {machines} "
                "(use --nnodes 1, or one run per machine with its own --out)"
            )
        # Only small objects and barriers cross processes (features go through the shared
        # files), so gloo serves GPU runs too.
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=_RANK_TIMEOUT)
        return cls(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))

    def on_rank0(self, work: Callable[[], _T]) -> _T:
        """Run ``work`` on rank 0 and hand its result, or its error, to every rank."""
        payload: tuple[bool, Any] = (True, None)
        if self.rank == 0:
            try:
                payload = (True, work())
            except (UserError, OSError) as err:
                payload = (False, first_line(err))
        if self.world > 1:
            box = [payload]
            dist.broadcast_object_list(box, src=0)
            payload = box[0]
        ok, value = payload
        if not ok:
            raise SharedError(value)
        return value

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
