"""What every kernel file shares: launch accounting and the ahead-of-time compile spec."""

from __future__ import annotations

import collections
import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

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


def is_interpreted(kernel: Any) -> bool:
    """Whether ``kernel`` was defined under the interpreter (fixed when it was defined, so a
    launcher asks once, at import, instead of reading the environment on every launch)."""
    return type(kernel).__name__ == "InterpretedFunction"


def cdiv(a: int, b: int) -> int:
    # triton.cdiv is a constexpr function whose host-side call costs microseconds.
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def row_bucket(n_rows: int) -> int:
    """The row count as the autotuners see it: powers of two up to 2^16, so a batch-1
    winner does not serve a full batch, without re-tuning for every row count."""
    return 1 << min(max(n_rows - 1, 0).bit_length(), 16)


@dataclass(frozen=True)
class KernelSpec:
    """One compile of one kernel for the ahead-of-time report (kernels/report.py).

    signature maps every runtime argument name to its Triton type ("*fp16", "i32", "fp32", ...);
    constexprs maps every constexpr argument name to its value; extra["attrs"], when present,
    is passed as ``ASTSource(..., attrs=...)`` (see ``jit_specialization``).
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    label: str
    extra: dict[str, Any] = field(default_factory=dict)


def as_rows(t: Any) -> tuple[Any, int, int]:
    """``(t, rows, row stride)`` of ``t`` seen as 2-D (rows, last dim) with a contiguous
    last dim; a kernel indexes ``t``'s data by them.

    Rows may keep any stride (a slice of a wider tensor is not copied); a copy is made only
    when the last dim is strided or the leading dims cannot collapse into one row stride.
    Contiguous tensors take no view at all (a view costs microseconds of host time).
    """
    if t.is_contiguous():
        width = t.shape[-1]
        return t, t.numel() // max(width, 1), width
    if t.dim() > 0 and t.stride(-1) != 1:
        t = t.contiguous()
    try:
        rows = t.view(-1, t.shape[-1])
    except RuntimeError:
        rows = t.reshape(-1, t.shape[-1])
    return rows, rows.shape[0], rows.stride(0)


def output_rows(t: Any) -> tuple[int, int]:
    """``(rows, row stride)`` of an output seen as 2-D without copying: a kernel must write
    into it, so it must have a contiguous last dim and leading dims that collapse."""
    if t.is_contiguous():
        width = t.shape[-1]
        return t.numel() // max(width, 1), width
    if t.dim() > 0 and t.stride(-1) != 1:
        raise ValueError("an output must have a contiguous last dimension")
    try:
        rows = t.view(-1, t.shape[-1])
    except RuntimeError as e:
        raise ValueError("an output's leading dimensions must collapse into one row stride") from e
    return rows.shape[0], rows.stride(0)


def output_tensor(
    out: Any, shape: tuple[int, ...], dtype: Any, device: Any, inputs: tuple[Any, ...] = ()
) -> Any:
    """``out`` after checking its shape and dtype, or a fresh contiguous tensor when None.

    A given ``out`` may not share storage with ``inputs``: on a GPU the autotuner replays the
    first launch of each key several times, and an output that is also an input would be
    rewritten from its own result.
    """
    if out is None:
        if inputs and inputs[0].shape == shape:
            # empty_like is the cheapest allocation call (host time, not memory).
            return torch.empty_like(inputs[0], dtype=dtype, memory_format=torch.contiguous_format)
        return torch.empty(shape, dtype=dtype, device=device)
    shape = tuple(shape)
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
    if v.shape != (length,) or (length > 1 and v.stride(0) != 1):
        raise ValueError(f"{name} must be a contiguous ({length},) vector, got {tuple(v.shape)}")


def device_arch(device: Any) -> int:
    """Compute capability as an int (sm_90 -> 90); 0 for a non-CUDA (interpreted) device."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if device.type != "cuda":
        return 0
    return _cuda_arch(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def nearest_arch(supported: Any, arch: int) -> int:
    """The newest architecture in ``supported`` not newer than ``arch`` (else the oldest)."""
    older = [a for a in supported if a <= arch]
    return max(older) if older else min(supported)


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
    autotuner ``tuned_for_arch(arch)`` picks the tile. The launch callable is cached per
    shape, so a steady-state launch is the kernel call.
    """
    _row_tile_launcher(kernel, tuned_for_arch, device_arch(device), n_rows, n_cols)(
        *args, **constexprs
    )


@functools.lru_cache(maxsize=1024)
def _row_tile_launcher(
    kernel: Any, tuned_for_arch: Any, arch: int, n_rows: int, n_cols: int
) -> Any:
    if is_interpreted(kernel):
        block_rows, block_cols = interpreter_tile(n_rows, n_cols)
        launch = kernel[(cdiv(n_rows, block_rows), 1)]
        return functools.partial(launch, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols)
    return tuned_for_arch(arch)[
        lambda meta: (cdiv(n_rows, meta["BLOCK_ROWS"]), cdiv(n_cols, meta["BLOCK_COLS"]))
    ]


def jit_specialization(
    kernel: Any, args: tuple, kwargs: dict[str, Any], arch: int
) -> tuple[dict[str, str], dict[str, Any], dict]:
    """(runtime signature, constexprs by name, ASTSource attrs) that Triton's JIT derives for
    launching ``kernel`` with ``args`` and ``kwargs`` (constexprs, num_warps, num_stages) on
    sm_<arch>: int32/int64, divisibility by 16 and arguments that become constexprs (None,
    the integer 1), by Triton 3.6's own binder (``create_function_from_signature``, then
    ``JITFunction._pack_args``), exactly as at run time. ``args`` may be meta tensors
    (address 0: aligned, as CUDA allocations are)."""
    backend, binder = _binder(kernel, arch)
    bound_args, specialization, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    runtime = {name: kind for name, kind in signature.items() if kind != "constexpr"}
    constexpr_values = {kernel.arg_names[path[0]]: value for path, value in constexprs.items()}
    return runtime, constexpr_values, attrs


@functools.cache
def _binder(kernel: Any, arch: int) -> tuple[Any, Any]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    return backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def specs_from_launches(
    name: str,
    kernel: Any,
    launches: Any,
    configs: Any,
    arch: int,
) -> list[KernelSpec]:
    """One KernelSpec per distinct compile of ``kernel``: every (label, args, constexprs)
    launch the library makes, under every (tile constexprs, num_warps, num_stages, label)
    config the autotuner may pick, specialised as the JIT would (``jit_specialization``)."""
    specs, seen = [], set()
    for launch_label, args, constexprs in launches:
        for tile, num_warps, num_stages, config_label in configs:
            kwargs = {**constexprs, **tile, "num_warps": num_warps, "num_stages": num_stages}
            signature, constexpr_values, attrs = jit_specialization(kernel, args, kwargs, arch)
            key = (
                tuple(signature.items()),
                tuple(sorted((k, str(v)) for k, v in constexpr_values.items())),
                tuple(sorted((str(k), str(v)) for k, v in attrs.items())),
                num_warps,
                num_stages,
            )
            if key in seen:
                continue
            seen.add(key)
            specs.append(
                KernelSpec(
                    name=name,
                    fn=kernel,
                    signature=signature,
                    constexprs=constexpr_values,
                    num_warps=num_warps,
                    num_stages=num_stages,
                    label=f"{launch_label} {config_label}".strip(),
                    extra={"attrs": attrs},
                )
            )
    return specs


def row_tiles(tiles: Any) -> list[tuple[dict[str, int], int, int, str]]:
    """``specs_from_launches`` configs of a row-tiled kernel's (rows, cols, warps) tiles."""
    return [
        ({"BLOCK_ROWS": rows, "BLOCK_COLS": cols}, warps, 1, f"rows={rows} cols={cols} w{warps}")
        for rows, cols, warps in tiles
    ]


def model_row_shapes() -> list[tuple[int, int]]:
    """(rows, width) of the row-kernel launches the default models make: dinov2 small, base,
    large, giant at 224 and 518 px, batch 1 and 64 (what the JIT specialises is the width,
    the strides and the dtypes; row counts are not specialised)."""
    return [(257 * batch, width) for width in (384, 768, 1024, 1536) for batch in (1, 64)]
