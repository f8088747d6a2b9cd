"""The whole model on the fused Triton path (interpreter on CPU) against the PyTorch path.

Every test counts kernel launches, so a silent fallback to the reference fails.
"""

import pytest
import torch

import dinov2_fast
from dinov2_fast import ops
from dinov2_fast.kernels._common import count_launches
from tests._models import randomize, rel_err

pytest.importorskip("triton")
pytestmark = pytest.mark.interpreter

LAYERS = 2
# head_dim 64, as in every released DINOv2; 56 px is a 4x4 grid (17 tokens).
TINY = {"hidden_size": 128, "num_attention_heads": 2, "num_hidden_layers": LAYERS, "image_size": 56}


def _pair(kind="Dinov2Model", dtype=torch.float32, **fields):
    config = dinov2_fast.Dinov2Config(**{**TINY, **fields})
    reference = randomize(getattr(dinov2_fast, kind)(config)).eval().set_backend("torch")
    fast = getattr(dinov2_fast, kind)(config).eval()
    fast.load_state_dict(reference.state_dict())
    return reference, fast.to(dtype).set_backend("triton")


def _expected_launches(swiglu=False, extra_norms=0):
    ffn = "swiglu" if swiglu else "gelu"
    return {
        "layer_norm": 1 + extra_norms,
        "attention": LAYERS,
        "add_layerscale_layernorm": 2 * LAYERS,
        ffn: LAYERS,
    }


MODELS = {
    "mlp": {},
    "swiglu": {"use_swiglu_ffn": True},
    "registers": {"num_register_tokens": 4},
}


@pytest.mark.parametrize("size", [(56, 56), (70, 42)], ids=["native", "non-square"])
@pytest.mark.parametrize("fields", MODELS.values(), ids=MODELS.keys())
@torch.no_grad()
def test_model_fp32_matches_the_torch_path(fields, size):
    reference, fast = _pair(**fields)
    pixels = torch.randn(2, 3, *size)
    with count_launches() as launches:
        out = fast(pixels, output_hidden_states=True)
    assert dict(launches) == _expected_launches(fields.get("use_swiglu_ffn", False))
    ref = reference(pixels, output_hidden_states=True)
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= 1e-4
    assert rel_err(out.pooler_output, ref.pooler_output) <= 1e-4
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert rel_err(ours, theirs) <= 1e-4


@torch.no_grad()
def test_model_fp16_within_1e2_of_fp32():
    reference, fast = _pair(dtype=torch.float16)
    pixels = torch.randn(2, 3, 56, 56)
    with count_launches() as launches:
        out = fast(pixels)
    assert launches["attention"] == LAYERS
    assert out.last_hidden_state.dtype == torch.float16
    assert rel_err(out.last_hidden_state, reference(pixels).last_hidden_state) <= 1e-2


@torch.no_grad()
def test_masks_and_head_mask():
    reference, fast = _pair()
    pixels = torch.randn(2, 3, 56, 56)
    masked = torch.rand(2, 16) < 0.4
    head_mask = torch.rand(LAYERS, 2)
    kwargs = {"bool_masked_pos": masked, "head_mask": head_mask}
    with count_launches() as launches:
        out = fast(pixels, **kwargs)
    assert launches["attention"] == LAYERS
    assert rel_err(out.last_hidden_state, reference(pixels, **kwargs).last_hidden_state) <= 1e-4


@torch.no_grad()
def test_classifier_and_backbone():
    reference, fast = _pair("Dinov2ForImageClassification", num_labels=5)
    pixels = torch.randn(3, 3, 56, 56)
    with count_launches() as launches:
        logits = fast(pixels).logits
    assert launches["attention"] == LAYERS
    assert rel_err(logits, reference(pixels).logits) <= 1e-4

    reference, fast = _pair("Dinov2Backbone", out_features=["stem", "stage1", "stage2"])
    with count_launches() as launches:
        maps = fast(pixels).feature_maps
    # The last stage reuses the final LayerNorm fused into the last block.
    assert dict(launches) == _expected_launches(extra_norms=2)
    for ours, theirs in zip(maps, reference(pixels).feature_maps, strict=True):
        assert rel_err(ours, theirs) <= 1e-4


def test_calls_the_kernels_cannot_serve_take_the_torch_path():
    reference, fast = _pair()
    pixels = torch.randn(1, 3, 56, 56)
    with count_launches() as launches, torch.no_grad():
        probs = fast(pixels, output_attentions=True).attentions
    assert not launches and len(probs) == LAYERS
    with count_launches() as launches:
        out = fast(pixels)  # gradients wanted: no backward kernels yet
    assert not launches
    out.last_hidden_state.sum().backward()
    assert fast.layernorm.weight.grad is not None


@torch.no_grad()
def test_packed_qkv_follows_parameter_changes():
    reference, fast = _pair()
    pixels = torch.randn(1, 3, 56, 56)
    fast(pixels)
    for model in (reference, fast):
        model.encoder.layer[0].attention.attention.key.weight.mul_(1.5)
    assert rel_err(fast(pixels).last_hidden_state, reference(pixels).last_hidden_state) <= 1e-4
    fast.load_state_dict(randomize(reference, seed=3).state_dict())
    assert rel_err(fast(pixels).last_hidden_state, reference(pixels).last_hidden_state) <= 1e-4


def test_backend_selection(monkeypatch):
    _, fast = _pair()
    pixels = torch.randn(1, 3, 56, 56)
    with count_launches() as launches, torch.no_grad():
        fast.set_backend("auto")(pixels)  # auto fuses on CUDA only
        fast.set_backend("triton")
        monkeypatch.setenv(ops.BACKEND_ENV_VAR, "torch")
        fast(pixels)
    assert not launches
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(ops.BACKEND_ENV_VAR)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run on cpu"):
        fast(pixels)


@torch.no_grad()
def test_packed_qkv_is_the_live_parameters():
    reference, fast = _pair()
    pixels = torch.randn(1, 3, 56, 56)
    fast(pixels)
    attention = fast.encoder.layer[0].attention.attention
    weights = [attention.query.weight, attention.key.weight, attention.value.weight]
    # One storage, no extra copy of the weights.
    assert len({w.untyped_storage().data_ptr() for w in weights}) == 1
    new_bias = torch.randn(128)
    for model in (reference, fast):
        # .data writes bypass version counters (an EMA teacher update does this).
        model.encoder.layer[0].attention.attention.value.weight.data.mul_(-2)
        model.encoder.layer[1].attention.attention.query.bias.data = new_bias.clone()
    assert rel_err(fast(pixels).last_hidden_state, reference(pixels).last_hidden_state) <= 1e-4


def test_gradients_for_the_input_take_the_torch_path():
    reference, fast = _pair()
    fast.requires_grad_(False)
    pixels = torch.randn(1, 3, 56, 56, requires_grad=True)
    with count_launches() as launches:
        fast(pixels).pooler_output.sum().backward()
    assert not launches
    expected = pixels.detach().clone().requires_grad_(True)
    reference(expected).pooler_output.sum().backward()
    assert rel_err(pixels.grad, expected.grad) <= 1e-5
