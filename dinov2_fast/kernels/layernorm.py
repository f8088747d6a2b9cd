"""LayerNorm, optionally fused with the residual add and LayerScale that precede it.

One kernel serves both entries. With ``HAS_RESIDUAL`` it reads the residual stream and a
branch output once, writes ``new = residual + scale * branch`` and ``LayerNorm(new)``, so the
residual stream costs one read and one write per half-block (DESIGN.md §3). Each program
normalises ``BLOCK_ROWS`` whole rows at once: small D gets several rows per program, large D
one row with more warps. Statistics are fp32 whatever the input dtype.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import (
    KernelSpec,
    as_rows,
    check_vector,
    device_arch,
    divisibility_attrs,
    interpreter_tile,
    interpreting,
    nearest_arch,
    output_rows,
    output_tensor,
    record_launch,
)

__all__ = ["add_layerscale_layernorm", "compile_specs", "layer_norm"]

# Per architecture: (elements per program, warps). Rows per program follow from BLOCK_D.
# Pruned by the ahead-of-time report: every entry compiles without spills for D up to 4096.
_TILES = {
    80: ((4096, 4), (8192, 8)),
    90: ((4096, 4), (8192, 8), (16384, 16)),
}
# At most this many fp32 elements of one row per thread, or registers spill at large D.
_MAX_ROW_ELEMENTS_PER_THREAD = 32


@triton.jit
def _layernorm_kernel(
    x_ptr,
    branch_ptr,
    scale_ptr,
    weight_ptr,
    bias_ptr,
    new_residual_ptr,
    normed_ptr,
    n_rows,
    n_cols,
    stride_x,
    stride_branch,
    stride_new_residual,
    stride_normed,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # int64 rows: rows * stride passes 2^31 for large batches of wide rows.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_RESIDUAL:
        branch = tl.load(
            branch_ptr + rows[:, None] * stride_branch + cols[None, :], mask=mask, other=0.0
        )
        scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        new_residual = (x + scale[None, :] * branch.to(tl.float32)).to(
            new_residual_ptr.dtype.element_ty
        )
        tl.store(
            new_residual_ptr + rows[:, None] * stride_new_residual + cols[None, :],
            new_residual,
            mask=mask,
        )
        # Normalise the stored (rounded) residual: the normed output must agree with the
        # stream the next block reads, as in the reference.
        x = new_residual.to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    centered = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / n_cols + eps)
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    normed = centered * rstd[:, None] * weight[None, :] + bias[None, :]
    tl.store(
        normed_ptr + rows[:, None] * stride_normed + cols[None, :],
        normed.to(normed_ptr.dtype.element_ty),
        mask=mask,
    )


def _tile_configs(arch: int, block_d: int) -> list[tuple[int, int]]:
    """(BLOCK_ROWS, num_warps) candidates for one architecture and row width."""
    configs = []
    for elements, warps in _TILES[nearest_arch(_TILES, arch)]:
        block_rows = max(1, elements // block_d)
        warps = max(warps, block_d // (32 * _MAX_ROW_ELEMENTS_PER_THREAD))
        configs.append((block_rows, min(warps, 32)))
    return sorted(set(configs))


@functools.cache
def _autotuned_kernel(arch: int, block_d: int) -> triton.runtime.Autotuner:
    configs = [
        triton.Config({"BLOCK_ROWS": block_rows}, num_warps=warps, num_stages=1)
        for block_rows, warps in _tile_configs(arch, block_d)
    ]
    return triton.autotune(configs=configs, key=["n_cols", "HAS_RESIDUAL"])(_layernorm_kernel)


def _launch(
    x: torch.Tensor,
    branch: torch.Tensor | None,
    scale: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    new_residual: torch.Tensor | None,
    normed: torch.Tensor,
) -> None:
    has_residual = branch is not None
    if has_residual and branch.shape != x.shape:
        raise ValueError(f"branch {tuple(branch.shape)} does not match residual {tuple(x.shape)}")
    x_rows = as_rows(x)
    normed_rows = output_rows(normed)
    n_rows, n_cols = x_rows.shape
    for name, v in (("weight", weight), ("bias", bias), ("scale", scale)):
        if v is not None:
            check_vector(name, v, n_cols)
    # Plain LayerNorm passes x for the unused pointers so one signature serves both modes.
    branch_rows = as_rows(branch) if has_residual else x_rows
    new_residual_rows = output_rows(new_residual) if has_residual else x_rows
    if n_rows == 0:
        return
    block_d = triton.next_power_of_2(n_cols)
    args = (
        x_rows,
        branch_rows,
        scale if has_residual else weight,
        weight,
        bias,
        new_residual_rows,
        normed_rows,
        n_rows,
        n_cols,
        x_rows.stride(0),
        branch_rows.stride(0),
        new_residual_rows.stride(0),
        normed_rows.stride(0),
        eps,
    )
    if interpreting():
        block_rows, _ = interpreter_tile(n_rows, n_cols)
        grid = (triton.cdiv(n_rows, block_rows),)
        _layernorm_kernel[grid](
            *args, HAS_RESIDUAL=has_residual, BLOCK_ROWS=block_rows, BLOCK_D=block_d
        )
    else:
        grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_ROWS"]),)
        _autotuned_kernel(device_arch(x.device), block_d)[grid](
            *args, HAS_RESIDUAL=has_residual, BLOCK_D=block_d
        )
    record_launch("add_layerscale_layernorm" if has_residual else "layer_norm")


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dimension; the result has ``x``'s dtype.

    ``out`` (same shape and dtype as the result, any row stride) receives the result instead
    of a fresh tensor; it must not overlap ``x``.
    """
    normed = output_tensor(out, x.shape, x.dtype, x.device, (x,))
    _launch(x, None, None, weight, bias, eps, None, normed)
    return normed


def add_layerscale_layernorm(
    residual: torch.Tensor,
    branch: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    *,
    out_residual: torch.Tensor | None = None,
    out_normed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``new = residual + scale * branch`` (residual's dtype) and ``LayerNorm(new)``
    (branch's dtype), in one pass. ``out_residual`` / ``out_normed`` optionally receive them;
    neither may overlap an input (the autotuner replays the launch).
    """
    inputs = (residual, branch)
    new_residual = output_tensor(
        out_residual, residual.shape, residual.dtype, residual.device, inputs
    )
    normed = output_tensor(out_normed, residual.shape, branch.dtype, residual.device, inputs)
    _launch(residual, branch, scale, weight, bias, eps, new_residual, normed)
    return new_residual, normed


# What the JIT specializes for the model's tensors: 16-byte-aligned pointers, D and row
# strides multiples of 16 (all DINOv2 widths are).
_ALIGNED_ARGS = (
    "x_ptr",
    "branch_ptr",
    "scale_ptr",
    "weight_ptr",
    "bias_ptr",
    "new_residual_ptr",
    "normed_ptr",
    "n_cols",
    "stride_x",
    "stride_branch",
    "stride_new_residual",
    "stride_normed",
)


def compile_specs(arch: int) -> list[KernelSpec]:
    """Every (D, dtype, mode, config) the ahead-of-time report compiles for ``arch``."""
    specs = []
    # D=1024 compiles exactly as D=768 (same BLOCK_D; D is a runtime argument).
    for n_cols in (384, 768, 1536, 4096):
        block_d = triton.next_power_of_2(n_cols)
        for dtype in ("fp16", "bf16"):
            for has_residual in (False, True):
                # The fused mode is compiled with an fp32 residual stream, its widest form.
                residual_dtype = "fp32" if has_residual else dtype
                signature = {
                    "x_ptr": f"*{residual_dtype}",
                    "branch_ptr": f"*{dtype}",
                    "scale_ptr": f"*{dtype}",
                    "weight_ptr": f"*{dtype}",
                    "bias_ptr": f"*{dtype}",
                    "new_residual_ptr": f"*{residual_dtype}",
                    "normed_ptr": f"*{dtype}",
                    "n_rows": "i32",
                    "n_cols": "i32",
                    "stride_x": "i32",
                    "stride_branch": "i32",
                    "stride_new_residual": "i32",
                    "stride_normed": "i32",
                    "eps": "fp32",
                }
                mode = "add_layerscale_layernorm" if has_residual else "layer_norm"
                for block_rows, warps in _tile_configs(arch, block_d):
                    specs.append(
                        KernelSpec(
                            name=mode,
                            fn=_layernorm_kernel,
                            signature=signature,
                            constexprs={
                                "HAS_RESIDUAL": has_residual,
                                "BLOCK_ROWS": block_rows,
                                "BLOCK_D": block_d,
                            },
                            num_warps=warps,
                            num_stages=1,
                            label=f"D={n_cols} {dtype} rows={block_rows} warps={warps}",
                            extra={"attrs": divisibility_attrs(_layernorm_kernel, _ALIGNED_ARGS)},
                        )
                    )
    return specs
