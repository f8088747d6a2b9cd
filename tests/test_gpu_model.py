"""Tier 3: the whole fused model natively on CUDA in bf16/fp16 (skipped without a GPU)."""

import copy

import pytest
import torch

import dinov2_fast
from dinov2_fast import ops
from dinov2_fast.kernels._common import count_launches
from tests._models import hf_model, randomize, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CONFIGS = {
    "base": {"size": "base", "num_hidden_layers": 4},
    "registers": {"size": "small", "num_hidden_layers": 4, "num_register_tokens": 4},
    "giant-swiglu": {"size": "giant", "num_hidden_layers": 2},
}


def _check_2x(fast_lowp, torch_lowp, reference_fp32, what):
    """The fused path's error is at most 2x the PyTorch path's in the same dtype (+ slack)."""
    ours, theirs = rel_err(fast_lowp, reference_fp32), rel_err(torch_lowp, reference_fp32)
    assert ours <= 2 * theirs + 1e-3, f"{what}: fused {ours:.2e} vs torch {theirs:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fields", CONFIGS.values(), ids=CONFIGS.keys())
@torch.no_grad()
def test_low_precision_model_within_2x_of_the_torch_path(fields, dtype):
    fields = dict(fields)
    config = dinov2_fast.Dinov2Config.for_size(fields.pop("size"), **fields)
    reference = randomize(dinov2_fast.Dinov2Model(config)).cuda().eval().set_backend("torch")
    lowp = copy.deepcopy(reference).to(dtype)
    pixels = torch.randn(4, 3, 224, 224, device="cuda")
    expected = reference(pixels, output_hidden_states=True)
    torch_out = lowp(pixels.to(dtype), output_hidden_states=True)
    with count_launches() as launches:
        fast_out = lowp.set_backend("triton")(pixels.to(dtype), output_hidden_states=True)
    assert launches["attention"] == config.num_hidden_layers
    _check_2x(
        fast_out.last_hidden_state,
        torch_out.last_hidden_state,
        expected.last_hidden_state,
        "last_hidden_state",
    )
    for i, (a, b, c) in enumerate(
        zip(fast_out.hidden_states, torch_out.hidden_states, expected.hidden_states, strict=True)
    ):
        _check_2x(a, b, c, f"hidden_states[{i}]")


@torch.no_grad()
def test_optimized_transformers_model_in_bf16():
    original = hf_model("Dinov2Model", hidden_size=384, num_attention_heads=6).cuda()
    fast = dinov2_fast.optimize(copy.deepcopy(original).to(torch.bfloat16))
    pixels = torch.randn(8, 3, 224, 224, device="cuda")
    expected = original(pixels).last_hidden_state
    unfused = copy.deepcopy(original).to(torch.bfloat16)(pixels.bfloat16()).last_hidden_state
    # Forced onto the kernels: on "auto" the first forward tunes a plan (and may pick SDPA).
    with ops.use_backend("triton"), count_launches() as launches:
        out = fast(pixels.bfloat16()).last_hidden_state
    assert launches["attention"] == 2
    _check_2x(out, unfused, expected, "optimized last_hidden_state")


@torch.no_grad()
def test_compiled_fused_model_matches_eager():
    config = dinov2_fast.Dinov2Config.for_size("small", num_hidden_layers=2)
    model = randomize(dinov2_fast.Dinov2Model(config)).cuda().half().eval().set_backend("triton")
    pixels = torch.randn(2, 3, 224, 224, device="cuda", dtype=torch.half)
    eager = model(pixels).last_hidden_state
    with count_launches() as launches:
        compiled = torch.compile(model, fullgraph=True)(pixels).last_hidden_state
    assert launches["attention"] >= 2  # the compiled graph calls the kernels
    assert rel_err(compiled, eager) <= 1e-3
