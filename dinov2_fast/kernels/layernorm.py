"""LayerNorm, optionally fused with the residual add and LayerScale that precede it.

One kernel serves both entries. With ``HAS_RESIDUAL`` it reads the residual stream and a
branch output once, writes ``new = residual + scale * branch`` and ``LayerNorm(new)``, so the
residual stream costs one read and one write per half-block (DESIGN.md §3). Each program
normalises ``BLOCK_ROWS`` whole rows at once: small D gets several rows per program, large D
one row with more warps. Statistics are fp32 whatever the input dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from ._common import (
    KernelSpec,
    as_rows,
    cdiv,
    check_vector,
    device_arch,
    interpreter_tile,
    is_interpreted,
    model_row_shapes,
    nearest_arch,
    next_power_of_2,
    output_rows,
    output_tensor,
    record_launch,
    row_bucket,
    specs_from_launches,
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


# Row counts only bound masks: specialising on them would compile once per batch size.
@triton.jit(do_not_specialize=("n_rows", "rows_bucket"))
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
    rows_bucket,
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


_INTERPRETED = is_interpreted(_layernorm_kernel)


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
    return triton.autotune(configs=configs, key=["n_cols", "rows_bucket", "HAS_RESIDUAL"])(
        _layernorm_kernel
    )


def _launch_args(
    x: torch.Tensor,
    branch: torch.Tensor | None,
    scale: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    new_residual: torch.Tensor | None,
    normed: torch.Tensor,
) -> tuple[tuple, dict[str, Any]]:
    """The kernel's runtime arguments and constexprs: one builder for the launch and the
    compile report, so the report compiles what runs."""
    has_residual = branch is not None
    if has_residual and branch.shape != x.shape:
        raise ValueError(f"branch {tuple(branch.shape)} does not match residual {tuple(x.shape)}")
    n_cols = x.shape[-1]
    # Spelled out, not a loop: this check is on the fused forward's hot path.
    dense = (
        x.is_contiguous()
        and normed.is_contiguous()
        and weight.is_contiguous()
        and bias.is_contiguous()
        and weight.shape == bias.shape == (n_cols,)
        and (
            not has_residual
            or (
                branch.is_contiguous()
                and new_residual.is_contiguous()
                and scale.is_contiguous()
                and scale.shape == (n_cols,)
            )
        )
    )
    if dense:
        # The fused forward's case, checked in a few calls: dense rows of width n_cols.
        n_rows = x.numel() // max(n_cols, 1)
        strides = (n_cols,) * 4
    else:
        x, n_rows, stride_x = as_rows(x)
        for name, v in (("weight", weight), ("bias", bias), ("scale", scale)):
            if v is not None:
                check_vector(name, v, n_cols)
        if has_residual:
            branch, _, stride_branch = as_rows(branch)
            stride_new_residual = output_rows(new_residual)[1]
        else:
            stride_branch = stride_new_residual = stride_x
        strides = (stride_x, stride_branch, stride_new_residual, output_rows(normed)[1])
    # Plain LayerNorm passes x for the unused pointers so one signature serves both modes.
    args = (
        x,
        branch if has_residual else x,
        scale if has_residual else weight,
        weight,
        bias,
        new_residual if has_residual else x,
        normed,
        n_rows,
        n_cols,
        *strides,
        eps,
        row_bucket(n_rows),
    )
    return args, {"HAS_RESIDUAL": has_residual, "BLOCK_D": next_power_of_2(n_cols)}


def _launch(*operands: Any) -> None:
    args, constexprs = _launch_args(*operands)
    n_rows, n_cols = args[7], args[8]
    if n_rows:
        _launcher(device_arch(args[0].device), n_rows, n_cols, constexprs["BLOCK_D"])(
            *args, **constexprs
        )
    record_launch("add_layerscale_layernorm" if constexprs["HAS_RESIDUAL"] else "layer_norm")


@functools.lru_cache(maxsize=1024)
def _launcher(arch: int, n_rows: int, n_cols: int, block_d: int) -> Any:
    """The launch callable of one shape, cached: a steady-state launch is the kernel call."""
    if _INTERPRETED:
        block_rows, _ = interpreter_tile(n_rows, n_cols)
        launch = _layernorm_kernel[(cdiv(n_rows, block_rows),)]
        return functools.partial(launch, BLOCK_ROWS=block_rows)
    return _autotuned_kernel(arch, block_d)[lambda meta: (cdiv(n_rows, meta["BLOCK_ROWS"]),)]


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


def compile_specs(arch: int) -> list[KernelSpec]:
    """Every compile of the model's launches (plain and fused, residual stream in the model's
    dtype, the default models' widths) and of the fp32-residual-stream variant the
    functional API accepts, under every tile, fp16 and bf16."""
    launches = []
    for dtype in (torch.float16, torch.bfloat16):
        for rows, width in model_row_shapes():
            for residual_dtype in (dtype, torch.float32):
                meta = {"device": "meta"}
                x = torch.empty(rows, width, dtype=residual_dtype, **meta)
                vector = torch.empty(width, dtype=dtype, **meta)
                normed = torch.empty(rows, width, dtype=dtype, **meta)
                name = f"{str(dtype)[6:]} D={width} residual {str(residual_dtype)[6:]}"
                if residual_dtype == dtype:
                    plain = (x, None, None, vector, vector, 1e-6, None, normed)
                    launches.append(("layer_norm", name, _launch_args(*plain)))
                branch = torch.empty(rows, width, dtype=dtype, **meta)
                fused = (x, branch, vector, vector, vector, 1e-6, torch.empty_like(x), normed)
                launches.append(("add_layerscale_layernorm", name, _launch_args(*fused)))
    specs = []
    for mode in ("layer_norm", "add_layerscale_layernorm"):
        for block_d in sorted({c["BLOCK_D"] for m, _, (_, c) in launches if m == mode}):
            group = [
                (label, args, constexprs)
                for m, label, (args, constexprs) in launches
                if m == mode and constexprs["BLOCK_D"] == block_d
            ]
            configs = [
                ({"BLOCK_ROWS": rows}, warps, 1, f"rows={rows} w{warps}")
                for rows, warps in _tile_configs(arch, block_d)
            ]
            specs += specs_from_launches(mode, _layernorm_kernel, group, configs, arch)
    return specs
