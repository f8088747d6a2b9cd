"""Tolerance rule shared by every kernel test (DESIGN.md §4).

A low-precision kernel is held to PyTorch itself: its error against a float32 (or float64)
reference may be at most twice the error PyTorch makes computing the same thing in the same
dtype, plus a small absolute slack for results PyTorch happens to get exactly right.
Also: inputs with strided rows and NaN-poisoned outputs, and (on import) a fix that makes
the Triton interpreter round bf16 like the GPU.
"""

from __future__ import annotations

import numpy as np
import torch


def _round_bf16_to_nearest_in_interpreter() -> None:
    """Make Triton 3.6's interpreter round fp32 -> bf16 casts to nearest even, as the GPU does.

    The interpreter truncates them (``InterpreterBuilder.cast_impl``), which alone doubles a
    bf16 kernel's error and would fail the 2x rule on the CPU for a kernel that is right on
    the GPU. Applied when this module is imported, i.e. by every kernel test.
    """
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    truncating_cast = interpreter.InterpreterBuilder.cast_impl
    if getattr(truncating_cast, "rounds_bf16_to_nearest", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            rounded = np.where(np.isnan(src.data), np.uint16(0x7FC0), rounded)
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return truncating_cast(self, src, dst_type)

    cast_impl.rounds_bf16_to_nearest = True
    interpreter.InterpreterBuilder.cast_impl = cast_impl


_round_bf16_to_nearest_in_interpreter()


def _errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = out.double() - ref.double()
    return diff.abs().max().item(), diff.pow(2).mean().sqrt().item()


def assert_close_2x(
    out: torch.Tensor,
    ref_fp32: torch.Tensor,
    torch_out_lowp: torch.Tensor,
    atol: float = 1e-5,
    *,
    name: str = "output",
) -> None:
    """Assert ``out`` is within 2x PyTorch's own error of ``ref_fp32``, plus ``atol``.

    ``torch_out_lowp`` is PyTorch's result in the same dtype as ``out``. Both the worst
    element (catches a single wrong row or an unwritten tail) and the root-mean-square
    error (the ‖out − ref‖ norm of §4, up to a constant) must pass. NaN anywhere fails,
    so outputs poisoned with NaN before a launch prove that every element was written.
    """
    assert out.shape == ref_fp32.shape == torch_out_lowp.shape, (
        f"{name}: shapes {tuple(out.shape)}, {tuple(ref_fp32.shape)}, {tuple(torch_out_lowp.shape)}"
    )
    assert out.dtype == torch_out_lowp.dtype, (
        f"{name}: dtype {out.dtype}, PyTorch gives {torch_out_lowp.dtype}"
    )
    nan_count = int(torch.isnan(out).sum())
    assert nan_count == 0, f"{name}: {nan_count} NaN elements (unwritten or bad math)"
    out_max, out_rms = _errors(out, ref_fp32)
    torch_max, torch_rms = _errors(torch_out_lowp, ref_fp32)
    assert out_max <= 2 * torch_max + atol, (
        f"{name}: max error {out_max:.3e} > 2 x PyTorch's {torch_max:.3e} + {atol:.1e}"
    )
    assert out_rms <= 2 * torch_rms + atol, (
        f"{name}: rms error {out_rms:.3e} > 2 x PyTorch's {torch_rms:.3e} + {atol:.1e}"
    )


def row_strided(shape: tuple[int, ...], dtype: torch.dtype, pad: int = 0) -> torch.Tensor:
    """Fresh ``randn`` tensor of ``shape``; with ``pad`` > 0 a view into a wider tensor, so
    its rows are strided (the last dim stays contiguous)."""
    wide = torch.randn(*shape[:-1], shape[-1] + pad, dtype=torch.float32).to(dtype)
    return wide[..., : shape[-1]]


def poisoned_rows(
    shape: tuple[int, ...], dtype: torch.dtype, pad: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(view, backing tensor) of NaN: a kernel writing into ``view`` must fill it entirely
    and leave the backing tensor's padding columns NaN."""
    wide = torch.full((*shape[:-1], shape[-1] + pad), float("nan"), dtype=dtype)
    return wide[..., : shape[-1]], wide


def assert_padding_untouched(backing: torch.Tensor, width: int) -> None:
    """The columns past ``width`` of a poisoned backing tensor are still all NaN."""
    assert torch.isnan(backing[..., width:]).all(), "kernel wrote outside its rows"
