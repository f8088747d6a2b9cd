"""SwiGLU and bias + GELU kernels against the reference."""

from __future__ import annotations

import pytest
import torch
import triton
from _numerics import assert_close_2x, assert_padding_untouched, poisoned_rows, row_strided

from dinov2_fast import reference
from dinov2_fast.kernels import gelu, swiglu
from dinov2_fast.kernels._common import _prune_wide_column_tiles, count_launches

# Tier 1 runs kernels on CPU tensors; gpu-marked tests run natively (conftest.py).
pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (batch, tokens, hidden): DINOv2's FFN widths (SwiGLU giant: 4096) at ragged token counts.
SHAPES = [(1, 1, 1536), (3, 17, 3072), (1, 257, 1536), (1, 261, 4096), (1, 1370, 384)]


def _shape_id(shape: tuple[int, int, int]) -> str:
    return "B{}-N{}-H{}".format(*shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_swiglu(shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    batch, tokens, hidden = shape
    packed = row_strided((batch, tokens, 2 * hidden), dtype, pad=64)
    out, backing = poisoned_rows((batch, tokens, hidden), dtype, pad=16)
    with count_launches() as launches:
        result = swiglu.swiglu(packed, out=out)
    assert launches == {"swiglu": 1}
    assert result is out
    assert_padding_untouched(backing, hidden)
    assert_close_2x(out, reference.swiglu(packed.double()), reference.swiglu(packed), atol=1e-5)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_gelu(shape: tuple[int, int, int], dtype: torch.dtype, with_bias: bool) -> None:
    batch, tokens, hidden = shape
    x = row_strided((batch, tokens, hidden), dtype, pad=32)
    bias = torch.randn(hidden).to(dtype) if with_bias else None
    out, backing = poisoned_rows((batch, tokens, hidden), dtype, pad=8)
    with count_launches() as launches:
        result = gelu.gelu(x, bias, out=out)
    assert launches == {"gelu": 1}
    assert result is out
    assert_padding_untouched(backing, hidden)
    expected = reference.gelu(x.double(), None if bias is None else bias.double())
    assert_close_2x(out, expected, reference.gelu(x, bias), atol=1e-5)


def test_fresh_outputs() -> None:
    packed = torch.randn(5, 2 * 384, dtype=torch.bfloat16)
    bias = torch.randn(384)
    with count_launches() as launches:
        activated = swiglu.swiglu(packed)
        gelu_out = gelu.gelu(packed[:, :384].float(), bias)
    assert launches == {"swiglu": 1, "gelu": 1}
    assert activated.shape == (5, 384) and activated.dtype == torch.bfloat16
    torch.testing.assert_close(gelu_out, reference.gelu(packed[:, :384].float(), bias))


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="even"):
        swiglu.swiglu(torch.randn(4, 7))
    with pytest.raises(ValueError, match="bias"):
        gelu.gelu(torch.randn(4, 8), torch.randn(7))


@pytest.mark.parametrize("n_cols,widest", [(384, 512), (1536, 1024), (100, 512)])
def test_autotune_pruning_keeps_tiles_that_fit(n_cols: int, widest: int) -> None:
    """GPU autotuning drops column tiles wider than the padded row (the narrowest stays)."""
    for tiles in (swiglu._TILES, gelu._TILES):
        for arch_tiles in tiles.values():
            configs = [
                triton.Config({"BLOCK_ROWS": rows, "BLOCK_COLS": cols}, num_warps=warps)
                for rows, cols, warps in arch_tiles
            ]
            kept = _prune_wide_column_tiles(configs, {"n_cols": n_cols})
            assert kept and max(c.kwargs["BLOCK_COLS"] for c in kept) == widest


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,hidden", [(1370, 1536), (16384, 4096), (16384, 3072)])
def test_gpu_elementwise(rows: int, hidden: int, dtype: torch.dtype) -> None:
    packed = row_strided((rows, 2 * hidden), dtype, pad=64).cuda()
    x = packed[:, :hidden]
    bias = torch.randn(hidden, device="cuda").to(dtype)
    with count_launches() as launches:
        activated = swiglu.swiglu(packed)
        gelu_out = gelu.gelu(x, bias)
    assert launches == {"swiglu": 1, "gelu": 1}
    assert_close_2x(
        activated, reference.swiglu(packed.double()), reference.swiglu(packed), atol=1e-5
    )
    assert_close_2x(
        gelu_out, reference.gelu(x.double(), bias.double()), reference.gelu(x, bias), atol=1e-5
    )
