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
    model_row_shapes,
    nearest_arch,
    output_rows,
    output_tensor,
    record_launch,
    row_bucket,
    row_tiles,
    specs_from_launches,
)

__all__ = ["compile_specs", "gelu"]

# Per architecture: (BLOCK_ROWS, BLOCK_COLS, warps). Hopper needs more bytes in flight, but
# erf is register-hungry: 64 values per thread took 155 registers (one block per SM), so
# tiles stay at or under 32 per thread.
_TILES = {
    80: ((2, 1024, 4), (4, 1024, 4), (8, 512, 4), (8, 1024, 8)),
    90: ((4, 1024, 4), (8, 512, 4), (4, 1024, 8), (8, 1024, 8)),
}
_RSQRT2 = tl.constexpr(0.7071067811865476)


# Row counts only bound masks: specialising on them would compile once per batch size.
@triton.jit(do_not_specialize=("n_rows", "rows_bucket"))
def _gelu_kernel(
    x_ptr,
    bias_ptr,
    out_ptr,
    n_rows,
    n_cols,
    stride_x,
    stride_out,
    rows_bucket,
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
    return autotune_row_tiles(_gelu_kernel, tiles, ["n_cols", "rows_bucket", "HAS_BIAS"])


def gelu(
    x: torch.Tensor, bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact GELU of ``x + bias`` (bias over the last dim, optional); returns x's dtype.

    ``out`` (x's shape and dtype, any row stride) receives the result instead of a fresh
    tensor; it must not overlap ``x`` (the autotuner replays the launch).
    """
    out = output_tensor(out, x.shape, x.dtype, x.device, (x,))
    args = _launch_args(x, bias, out)
    n_rows, n_cols = args[3], args[4]
    if n_rows == 0 or n_cols == 0:
        return out
    launch_row_tiles(
        _gelu_kernel, _autotuned_kernel, x.device, args, n_rows, n_cols, HAS_BIAS=bias is not None
    )
    record_launch("gelu")
    return out


def _launch_args(x: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> tuple:
    """The kernel's runtime arguments: one builder for the launch and the compile report."""
    x_rows, n_rows, stride_x = as_rows(x)
    n_cols = x.shape[-1]
    if bias is not None:
        check_vector("bias", bias, n_cols)
    return (
        x_rows,
        x_rows if bias is None else bias,
        out,
        n_rows,
        n_cols,
        stride_x,
        output_rows(out)[1],
        row_bucket(n_rows),
    )


def compile_specs(arch: int) -> list[KernelSpec]:
    """Every compile of the model's launches (fc1 outputs of the default MLP models, bias
    added by the GEMM, and the functional API's bias variant) under every tile, fp16, bf16."""
    launches = []
    for dtype in (torch.float16, torch.bfloat16):
        for rows, width in model_row_shapes():
            x = torch.empty(rows, 4 * width, dtype=dtype, device="meta")
            for bias in (None, torch.empty(4 * width, dtype=dtype, device="meta")):
                label = f"{str(dtype)[6:]} {'bias' if bias is not None else 'no-bias'}"
                args = _launch_args(x, bias, torch.empty_like(x))
                launches.append((label, args, {"HAS_BIAS": bias is not None}))
    configs = row_tiles(_TILES[nearest_arch(_TILES, arch)])
    return specs_from_launches("gelu", _gelu_kernel, launches, configs, arch)
