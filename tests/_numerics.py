"""Tolerance rule shared by every kernel test (DESIGN.md §4).

A low-precision kernel is held to PyTorch itself: its error against a float32 (or float64)
reference may be at most twice the error PyTorch makes computing the same thing in the same
dtype, plus a small absolute slack for results PyTorch happens to get exactly right.
"""

from __future__ import annotations

import torch


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
