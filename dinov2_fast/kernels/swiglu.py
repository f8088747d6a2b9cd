"""SwiGLU activation, ``silu(gate) * up``, from the packed ``[gate | up]`` GEMM output.

One read of the packed tensor, one write of the half-width result, fp32 math and one
rounding. The input may be a row-strided view; the gate is the first half of the last dim.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import (
    KernelSpec,
    as_rows,
    autotune_row_tiles,
    launch_row_tiles,
    nearest_arch,
    output_rows,
    output_tensor,
    record_launch,
    row_tile_specs,
)

__all__ = ["compile_specs", "swiglu"]

# Per architecture: (BLOCK_ROWS, BLOCK_COLS, warps). Hopper needs more bytes in flight.
_TILES = {
    80: ((2, 1024, 4), (4, 1024, 4), (8, 512, 4), (8, 1024, 8)),
    90: ((4, 1024, 4), (8, 512, 4), (8, 1024, 8), (16, 1024, 8)),
}
_ALIGNED_ARGS = ("x_ptr", "out_ptr", "n_cols", "stride_x", "stride_out")


@triton.jit
def _swiglu_kernel(
    x_ptr,
    out_ptr,
    n_rows,
    n_cols,
    stride_x,
    stride_out,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    gate_ptrs = x_ptr + rows[:, None] * stride_x + cols[None, :]
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + n_cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(
        out_ptr + rows[:, None] * stride_out + cols[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@functools.cache
def _autotuned_kernel(arch: int) -> triton.runtime.Autotuner:
    return autotune_row_tiles(_swiglu_kernel, _TILES[nearest_arch(_TILES, arch)], ["n_cols"])


def swiglu(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` where ``x = [gate | up]`` on the last dim; returns x's dtype.

    ``out`` (half of x's last dim, any row stride) receives the result instead of a fresh
    tensor; it must not overlap ``x`` (the autotuner replays the launch).
    """
    if x.shape[-1] % 2:
        raise ValueError(f"packed [gate | up] needs an even last dim, got {x.shape[-1]}")
    shape = (*x.shape[:-1], x.shape[-1] // 2)
    out = output_tensor(out, shape, x.dtype, x.device, (x,))
    x_rows, out_rows = as_rows(x), output_rows(out)
    n_rows, n_cols = out_rows.shape
    if n_rows == 0 or n_cols == 0:
        return out
    args = (x_rows, out_rows, n_rows, n_cols, x_rows.stride(0), out_rows.stride(0))
    launch_row_tiles(_swiglu_kernel, _autotuned_kernel, x.device, args, n_rows, n_cols)
    record_launch("swiglu")
    return out


def compile_specs(arch: int) -> list[KernelSpec]:
    """Every (dtype, tile) the ahead-of-time report compiles for ``arch``."""
    tiles = _TILES[nearest_arch(_TILES, arch)]
    specs = []
    for dtype in ("fp16", "bf16"):
        signature = {
            "x_ptr": f"*{dtype}",
            "out_ptr": f"*{dtype}",
            "n_rows": "i32",
            "n_cols": "i32",
            "stride_x": "i32",
            "stride_out": "i32",
        }
        specs += row_tile_specs(
            "swiglu", _swiglu_kernel, signature, tiles, _ALIGNED_ARGS, label=dtype
        )
    return specs
