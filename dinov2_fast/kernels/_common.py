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
    constexprs maps every constexpr argument name to its value; extra["attrs"], when present,
    is passed as ``ASTSource(..., attrs=...)`` (see ``divisibility_attrs``).
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    label: str
    extra: dict[str, Any] = field(default_factory=dict)


def as_rows(t: Any) -> Any:
    """View ``t`` as a 2-D (rows, last dim) tensor whose last dim is contiguous.

    Rows may keep any stride (a slice of a wider tensor stays a view); a copy is made only
    when the last dim is strided or the leading dims cannot collapse into one row stride.
    """
    if t.dim() > 0 and t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1])


def output_rows(t: Any) -> Any:
    """View an output as 2-D (rows, last dim) without copying: a kernel must write into it."""
    if t.dim() > 0 and t.stride(-1) != 1:
        raise ValueError("an output must have a contiguous last dimension")
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError as e:
        raise ValueError("an output's leading dimensions must collapse into one row stride") from e


def output_tensor(
    out: Any, shape: tuple[int, ...], dtype: Any, device: Any, inputs: tuple[Any, ...] = ()
) -> Any:
    """``out`` after checking its shape and dtype, or a fresh tensor when it is None.

    A given ``out`` may not share storage with ``inputs``: on a GPU the autotuner replays the
    first launch of each key several times, and an output that is also an input would be
    rewritten from its own result.
    """
    import torch

    shape = tuple(shape)
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype:
        raise ValueError(f"out must be {shape} {dtype}, got {tuple(out.shape)} {out.dtype}")
    check_no_shared_storage(out, inputs)
    return out


def check_no_shared_storage(out: Any, inputs: tuple[Any, ...]) -> None:
    """Refuse an output that shares memory with an input (see ``output_tensor``)."""
    address = out.untyped_storage().data_ptr()
    if any(t is not None and t.untyped_storage().data_ptr() == address for t in inputs):
        raise ValueError("an output may not share memory with an input of the same call")


def check_vector(name: str, v: Any, length: int) -> None:
    """A per-feature parameter (LayerNorm weight, bias, LayerScale) must be contiguous (length,)."""
    if tuple(v.shape) != (length,) or (length > 1 and v.stride(0) != 1):
        raise ValueError(f"{name} must be a contiguous ({length},) vector, got {tuple(v.shape)}")


def device_arch(device: Any) -> int:
    """Compute capability as an int (sm_90 -> 90); 0 for a non-CUDA (interpreted) device."""
    import torch

    if torch.device(device).type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def nearest_arch(supported: Any, arch: int) -> int:
    """The newest architecture in ``supported`` not newer than ``arch`` (else the oldest)."""
    older = [a for a in supported if a <= arch]
    return max(older) if older else min(supported)


def divisibility_attrs(fn: Any, arg_names: Any) -> dict[tuple[int], list[list]]:
    """ASTSource attrs declaring ``arg_names`` of ``fn`` divisible by 16.

    The JIT specializes 16-byte-aligned pointers and multiple-of-16 integers on its own;
    an ahead-of-time compile must say so, or it checks unvectorized code the runtime never runs.
    """
    return {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in arg_names}


def _prune_wide_column_tiles(configs: list, named_args: dict, **kwargs: Any) -> list:
    """Autotune pruning for row-tiled elementwise kernels: drop configs whose BLOCK_COLS
    exceeds the padded row width (they would only mask lanes off), keeping the narrowest."""
    padded = 1 << max(int(named_args["n_cols"]) - 1, 0).bit_length()
    fitting = [c for c in configs if c.kwargs["BLOCK_COLS"] <= padded]
    return fitting or [min(configs, key=lambda c: c.kwargs["BLOCK_COLS"])]


def interpreter_tile(n_rows: int, n_cols: int, elements: int = 1 << 16) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS) for the interpreter, which pays per program, not per element:
    whole rows and as many of them as fit in ``elements``."""
    block_cols = 1 << max(n_cols - 1, 0).bit_length()
    block_rows = 1 << max(n_rows - 1, 0).bit_length()
    return min(block_rows, max(1, elements // block_cols)), block_cols


def autotune_row_tiles(kernel: Any, tiles: Any, key: list[str]) -> Any:
    """Autotuner over (BLOCK_ROWS, BLOCK_COLS, num_warps) ``tiles`` for a row-tiled kernel."""
    import triton

    configs = [
        triton.Config({"BLOCK_ROWS": rows, "BLOCK_COLS": cols}, num_warps=warps, num_stages=1)
        for rows, cols, warps in tiles
    ]
    return triton.autotune(
        configs=configs, key=key, prune_configs_by={"early_config_prune": _prune_wide_column_tiles}
    )(kernel)


def launch_row_tiles(
    kernel: Any,
    tuned_for_arch: Any,
    device: Any,
    args: tuple,
    n_rows: int,
    n_cols: int,
    **constexprs: Any,
) -> None:
    """Launch a kernel tiled over (row blocks, column blocks) of a (n_rows, n_cols) output.

    Under the interpreter ``kernel`` runs once per block of whole rows; on a GPU the
    autotuner ``tuned_for_arch(arch)`` picks the tile.
    """
    import triton

    if interpreting():
        block_rows, block_cols = interpreter_tile(n_rows, n_cols)
        grid = (triton.cdiv(n_rows, block_rows), 1)
        kernel[grid](*args, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, **constexprs)
    else:
        grid = lambda meta: (
            triton.cdiv(n_rows, meta["BLOCK_ROWS"]),
            triton.cdiv(n_cols, meta["BLOCK_COLS"]),
        )
        tuned_for_arch(device_arch(device))[grid](*args, **constexprs)


def row_tile_specs(
    name: str,
    kernel: Any,
    signature: dict[str, str],
    tiles: Any,
    aligned_args: tuple[str, ...],
    constexprs: dict[str, Any] | None = None,
    label: str = "",
) -> list[KernelSpec]:
    """One KernelSpec per (BLOCK_ROWS, BLOCK_COLS, num_warps) tile of a row-tiled kernel."""
    return [
        KernelSpec(
            name=name,
            fn=kernel,
            signature=signature,
            constexprs={**(constexprs or {}), "BLOCK_ROWS": rows, "BLOCK_COLS": cols},
            num_warps=warps,
            num_stages=1,
            label=f"{label} rows={rows} cols={cols} warps={warps}".strip(),
            extra={"attrs": divisibility_attrs(kernel, aligned_args)},
        )
        for rows, cols, warps in tiles
    ]
