"""Exact (erf) GELU of ``x`` (+ an optional bias) in one pass: the fc1 epilogue of the MLP.

The model lets cuBLAS add fc1's bias in its GEMM epilogue and calls this without one; the
``bias`` argument serves a bias-free GEMM. The kernel reads once, applies
``0.5 * x * (1 + erf(x / sqrt(2)))`` in fp32 and writes once. It writes a
new tensor rather than updating the GEMM output in place: the caching allocator makes the
allocation free, the traffic is the same, and the functional op stays alias-free for
torch.compile and the autotuner (which replays launches).
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
    check_vector,
    launch_row_tiles,
    nearest_arch,
    output_rows,
    output_tensor,
    record_launch,
    row_tile_specs,
)

__all__ = ["compile_specs", "gelu"]

# Per architecture: (BLOCK_ROWS, BLOCK_COLS, warps). Hopper needs more bytes in flight, but
# erf is register-hungry: 64 values per thread took 155 registers (one block per SM), so
# tiles stay at or under 32 per thread.
_TILES = {
    80: ((2, 1024, 4), (4, 1024, 4), (8, 512, 4), (8, 1024, 8)),
    90: ((4, 1024, 4), (8, 512, 4), (4, 1024, 8), (8, 1024, 8)),
}
_ALIGNED_ARGS = ("x_ptr", "bias_ptr", "out_ptr", "n_cols", "stride_x", "stride_out")
_RSQRT2 = tl.constexpr(0.7071067811865476)


@triton.jit
def _gelu_kernel(
    x_ptr,
    bias_ptr,
    out_ptr,
    n_rows,
    n_cols,
    stride_x,
    stride_out,
    HAS_BIAS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out = 0.5 * x * (1.0 + tl.math.erf(x * _RSQRT2))
    tl.store(
        out_ptr + rows[:, None] * stride_out + cols[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@functools.cache
def _autotuned_kernel(arch: int) -> triton.runtime.Autotuner:
    tiles = _TILES[nearest_arch(_TILES, arch)]
    return autotune_row_tiles(_gelu_kernel, tiles, ["n_cols", "HAS_BIAS"])


def gelu(
    x: torch.Tensor, bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact GELU of ``x + bias`` (bias over the last dim, optional); returns x's dtype.

    ``out`` (x's shape and dtype, any row stride) receives the result instead of a fresh
    tensor; it must not overlap ``x`` (the autotuner replays the launch).
    """
    out = output_tensor(out, x.shape, x.dtype, x.device, (x,))
    x_rows, out_rows = as_rows(x), output_rows(out)
    n_rows, n_cols = x_rows.shape
    if bias is not None:
        check_vector("bias", bias, n_cols)
    if n_rows == 0 or n_cols == 0:
        return out
    args = (
        x_rows,
        x_rows if bias is None else bias,
        out_rows,
        n_rows,
        n_cols,
        x_rows.stride(0),
        out_rows.stride(0),
    )
    launch_row_tiles(
        _gelu_kernel, _autotuned_kernel, x.device, args, n_rows, n_cols, HAS_BIAS=bias is not None
    )
    record_launch("gelu")
    return out


def compile_specs(arch: int) -> list[KernelSpec]:
    """Every (dtype, bias, tile) the ahead-of-time report compiles for ``arch``."""
    tiles = _TILES[nearest_arch(_TILES, arch)]
    specs = []
    for dtype in ("fp16", "bf16"):
        signature = {
            "x_ptr": f"*{dtype}",
            "bias_ptr": f"*{dtype}",
            "out_ptr": f"*{dtype}",
            "n_rows": "i32",
            "n_cols": "i32",
            "stride_x": "i32",
            "stride_out": "i32",
        }
        for has_bias in (False, True):
            specs += row_tile_specs(
                "gelu",
                _gelu_kernel,
                signature,
                tiles,
                _ALIGNED_ARGS,
                constexprs={"HAS_BIAS": has_bias},
                label=f"{dtype} {'bias' if has_bias else 'no-bias'}",
            )
    return specs
