"""LayerNorm and the fused residual + LayerScale + LayerNorm kernel against the reference."""

from __future__ import annotations

import pytest
import torch
from _numerics import assert_close_2x, assert_padding_untouched, poisoned_rows, row_strided

from dinov2_fast import reference
from dinov2_fast.kernels import layernorm
from dinov2_fast.kernels._common import count_launches

# Tier 1 runs kernels on CPU tensors; gpu-marked tests run natively (conftest.py).
pytestmark = pytest.mark.interpreter

EPS = 1e-6

# (batch, tokens, D, dtype): every D, token count and dtype appears, without the full
# cartesian product the interpreter could not afford.
CASES = [
    (1, 1, 384, torch.float32),
    (3, 17, 768, torch.float16),
    (1, 257, 1024, torch.bfloat16),
    (1, 261, 1536, torch.float32),
    (1, 1370, 384, torch.bfloat16),
    (3, 257, 384, torch.float16),
    (1, 17, 1536, torch.bfloat16),
    (1, 261, 768, torch.bfloat16),
    (1, 1370, 1024, torch.float16),
    (2, 17, 4096, torch.bfloat16),
]


def _params(dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random LayerScale, weight and bias: the defaults (ones, zeros) hide bugs."""
    scale = (0.5 * torch.randn(dim)).to(dtype)
    weight = (1 + 0.5 * torch.randn(dim)).to(dtype)
    bias = torch.randn(dim).to(dtype)
    return scale, weight, bias


def _ids(case: tuple) -> str:
    batch, tokens, dim, dtype = case
    return f"B{batch}-N{tokens}-D{dim}-{str(dtype).removeprefix('torch.')}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_layer_norm(case: tuple) -> None:
    batch, tokens, dim, dtype = case
    x = row_strided((batch, tokens, dim), dtype, pad=32)
    _, weight, bias = _params(dim, dtype)
    out, backing = poisoned_rows((batch, tokens, dim), dtype, pad=16)
    with count_launches() as launches:
        result = layernorm.layer_norm(x, weight, bias, EPS, out=out)
    assert launches == {"layer_norm": 1}
    assert result is out
    assert_padding_untouched(backing, dim)
    expected = reference.layer_norm(x.double(), weight.double(), bias.double(), EPS)
    assert_close_2x(out, expected, reference.layer_norm(x, weight, bias, EPS), atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("fp32_residual", [False, True], ids=["same-dtype", "fp32-residual"])
def test_add_layerscale_layernorm(case: tuple, fp32_residual: bool) -> None:
    batch, tokens, dim, dtype = case
    if fp32_residual and dtype == torch.float32:
        pytest.skip("same as same-dtype")
    residual_dtype = torch.float32 if fp32_residual else dtype
    residual = row_strided((batch, tokens, dim), residual_dtype, pad=48)
    branch = row_strided((batch, tokens, dim), dtype, pad=16)
    # Parameters in the model's (branch's) dtype, also when the residual stream is fp32.
    scale, weight, bias = _params(dim, dtype)
    out_residual, residual_backing = poisoned_rows((batch, tokens, dim), residual_dtype, pad=8)
    out_normed = torch.full((batch, tokens, dim), float("nan"), dtype=dtype)
    with count_launches() as launches:
        new_residual, normed = layernorm.add_layerscale_layernorm(
            residual, branch, scale, weight, bias, EPS,
            out_residual=out_residual, out_normed=out_normed,
        )  # fmt: skip
    assert launches == {"add_layerscale_layernorm": 1}
    assert new_residual is out_residual and normed is out_normed
    assert_padding_untouched(residual_backing, dim)

    expected_residual, expected_normed = reference.add_layerscale_layernorm(
        *(t.double() for t in (residual, branch, scale, weight, bias)), EPS
    )
    torch_residual, torch_normed = reference.add_layerscale_layernorm(
        residual, branch, scale, weight, bias, EPS
    )
    assert_close_2x(new_residual, expected_residual, torch_residual, atol=1e-5, name="residual")
    # The kernel normalises its own rounded residual; measure it against the exact LayerNorm
    # of that residual, as PyTorch's normed output is of its own.
    assert_close_2x(
        normed,
        reference.layer_norm(new_residual.double(), weight.double(), bias.double(), EPS),
        torch_normed,
        atol=1e-5,
        name="normed",
    )
    assert_close_2x(
        normed.double(), expected_normed, torch_normed.double(), atol=1e-2, name="normed-end"
    )


@pytest.mark.parametrize(
    "make_x",
    [lambda: torch.randn(64, 384).t(), lambda: torch.randn(17, 3, 384).transpose(0, 1)],
    ids=["strided-last-dim", "uncollapsible-rows"],
)
def test_fresh_outputs_from_layouts_that_need_a_copy(make_x) -> None:
    """Without out= the launcher allocates; layouts one row stride cannot describe are copied."""
    x = make_x()
    _, weight, bias = _params(x.shape[-1], torch.float32)
    with count_launches() as launches:
        out = layernorm.layer_norm(x, weight, bias, EPS)
    assert launches == {"layer_norm": 1}
    torch.testing.assert_close(out, reference.layer_norm(x, weight, bias, EPS))


def test_rejects_bad_shapes() -> None:
    x = torch.randn(4, 384)
    with pytest.raises(ValueError, match="weight"):
        layernorm.layer_norm(x, torch.randn(383), torch.randn(384), EPS)
    with pytest.raises(ValueError, match="out"):
        layernorm.layer_norm(x, torch.randn(384), torch.randn(384), EPS, out=torch.empty(4, 385))


def test_tile_configs_cover_every_width() -> None:
    """Every architecture has configs for every width, with at most 32 row elements per
    thread (more spills at D=4096, as the ahead-of-time report showed)."""
    for arch in (80, 90):
        for block_d in (512, 1024, 2048, 4096, 8192):
            configs = layernorm._tile_configs(arch, block_d)
            assert configs
            for _, warps in configs:
                assert block_d // (32 * warps) <= 32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dim", [384, 768, 1024, 1536, 4096])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1370, 16384])
def test_gpu_add_layerscale_layernorm(dim: int, dtype: torch.dtype, rows: int) -> None:
    residual = row_strided((rows, dim), torch.float32, pad=64).cuda()
    branch = row_strided((rows, dim), dtype, pad=0).cuda()
    scale, weight, bias = (t.cuda() for t in _params(dim, dtype))
    with count_launches() as launches:
        new_residual, normed = layernorm.add_layerscale_layernorm(
            residual, branch, scale, weight, bias, EPS
        )
        plain = layernorm.layer_norm(branch, weight, bias, EPS)
    assert launches == {"add_layerscale_layernorm": 1, "layer_norm": 1}
    expected_residual, _ = reference.add_layerscale_layernorm(
        *(t.double() for t in (residual, branch, scale, weight, bias)), EPS
    )
    torch_residual, torch_normed = reference.add_layerscale_layernorm(
        residual, branch, scale, weight, bias, EPS
    )
    assert_close_2x(new_residual, expected_residual, torch_residual, atol=1e-5)
    assert_close_2x(
        normed,
        reference.layer_norm(new_residual.double(), weight.double(), bias.double(), EPS),
        torch_normed,
        atol=1e-5,
    )
    assert_close_2x(
        plain,
        reference.layer_norm(branch.double(), weight.double(), bias.double(), EPS),
        reference.layer_norm(branch, weight, bias, EPS),
        atol=1e-5,
    )
