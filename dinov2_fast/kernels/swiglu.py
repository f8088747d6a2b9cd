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
    model_row_shapes,
    nearest_arch,
    output_rows,
    output_tensor,
    record_launch,
    row_bucket,
    row_tiles,
    specs_from_launches,
)

__all__ = ["compile_specs", "swiglu"]

# Per architecture: (BLOCK_ROWS, BLOCK_COLS, warps). Hopper needs more bytes in flight.
_TILES = {
    80: ((2, 1024, 4), (4, 1024, 4), (8, 512, 4), (8, 1024, 8)),
    90: ((4, 1024, 4), (8, 512, 4), (8, 1024, 8), (16, 1024, 8)),
}


# Row counts only bound masks: specialising on them would compile once per batch size.
@triton.jit(do_not_specialize=("n_rows", "rows_bucket"))
def _swiglu_kernel(
    x_ptr,
    out_ptr,
    n_rows,
    n_cols,
    stride_x,
    stride_out,
    rows_bucket,
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
    tiles = _TILES[nearest_arch(_TILES, arch)]
    return autotune_row_tiles(_swiglu_kernel, tiles, ["n_cols", "rows_bucket"])


def swiglu(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` where ``x = [gate | up]`` on the last dim; returns x's dtype.

    ``out`` (half of x's last dim, any row stride) receives the result instead of a fresh
    tensor; it must not overlap ``x`` (the autotuner replays the launch).
    """
    if x.shape[-1] % 2:
        raise ValueError(f"packed [gate | up] needs an even last dim, got {x.shape[-1]}")
    shape = (*x.shape[:-1], x.shape[-1] // 2)
    out = output_tensor(out, shape, x.dtype, x.device, (x,))
    args = _launch_args(x, out)
    n_rows, n_cols = args[2], args[3]
    if n_rows == 0 or n_cols == 0:
        return out
    launch_row_tiles(_swiglu_kernel, _autotuned_kernel, x.device, args, n_rows, n_cols)
    record_launch("swiglu")
    return out


def _launch_args(x: torch.Tensor, out: torch.Tensor) -> tuple:
    """The kernel's runtime arguments: one builder for the launch and the compile report."""
    x_rows, n_rows, stride_x = as_rows(x)
    stride_out = output_rows(out)[1]
    return (x_rows, out, n_rows, out.shape[-1], stride_x, stride_out, row_bucket(n_rows))


def compile_specs(arch: int) -> list[KernelSpec]:
    """Every compile of the model's launches (giant's SwiGLU, hidden 4096, packed 8192, and
    the other widths' ratio-4 hidden sizes) under every tile, fp16 and bf16."""
    launches = []
    for dtype in (torch.float16, torch.bfloat16):
        for rows, width in model_row_shapes():
            hidden = ((int(width * 4) * 2 // 3 + 7) // 8) * 8
            x = torch.empty(rows, 2 * hidden, dtype=dtype, device="meta")
            out = torch.empty(rows, hidden, dtype=dtype, device="meta")
            launches.append((str(dtype)[6:], _launch_args(x, out), {}))
    configs = row_tiles(_TILES[nearest_arch(_TILES, arch)])
    return specs_from_launches("swiglu", _swiglu_kernel, launches, configs, arch)
