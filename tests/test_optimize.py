"""optimize() on transformers' own models, and the "dinov2_fast" attention implementation.

Kernels run under the Triton interpreter; launch counts prove the fused path ran.
"""

import copy

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import dinov2_fast
from dinov2_fast.kernels._common import count_launches
from tests._models import hf_model, rel_err

pytest.importorskip("triton")
pytestmark = pytest.mark.interpreter

LAYERS = 2
HEAD64 = {"hidden_size": 128, "num_attention_heads": 2}


def _optimized_pair(kind, registers=0, **fields):
    original = hf_model(kind, registers, **HEAD64, **fields)
    return original, dinov2_fast.optimize(copy.deepcopy(original))


CLASSES = {
    "model": ("Dinov2Model", 0, {}),
    "model-swiglu": ("Dinov2Model", 0, {"use_swiglu_ffn": True}),
    "registers": ("Dinov2Model", 4, {}),
    "classifier": ("Dinov2ForImageClassification", 0, {"num_labels": 3}),
    "registers-classifier": ("Dinov2ForImageClassification", 2, {"num_labels": 3}),
}


@pytest.mark.parametrize("kind,registers,fields", CLASSES.values(), ids=CLASSES.keys())
@torch.no_grad()
def test_optimized_model_matches_the_original(kind, registers, fields):
    original, fast = _optimized_pair(kind, registers, **fields)
    assert type(fast) is type(original)
    assert list(fast.state_dict()) == list(original.state_dict())
    pixels = torch.randn(2, 3, 56, 70)
    with count_launches() as launches:
        out = fast(pixels, output_hidden_states=True)
    ffn = "swiglu" if fields.get("use_swiglu_ffn") else "gelu"
    assert dict(launches) == {
        "layer_norm": LAYERS + 1,
        "attention": LAYERS,
        "add_layerscale_layernorm": LAYERS,
        ffn: LAYERS,
    }
    ref = original(pixels, output_hidden_states=True)
    main = "logits" if "Classification" in kind else "last_hidden_state"
    assert rel_err(getattr(out, main), getattr(ref, main)) <= 1e-4
    assert len(out.hidden_states) == LAYERS + 1
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert rel_err(ours, theirs) <= 1e-4


@pytest.mark.parametrize("registers", [0, 4])
@torch.no_grad()
def test_optimized_backbone(registers):
    original, fast = _optimized_pair(
        "Dinov2Backbone", registers, out_features=["stem", "stage1", "stage2"]
    )
    pixels = torch.randn(1, 3, 42, 70)
    with count_launches() as launches:
        maps = fast(pixels).feature_maps
    assert launches["attention"] == LAYERS and launches["layer_norm"] == LAYERS + 3
    for ours, theirs in zip(maps, original(pixels).feature_maps, strict=True):
        assert rel_err(ours, theirs) <= 1e-4


def test_calls_the_kernels_cannot_serve_keep_the_original_forward():
    _, fast = _optimized_pair("Dinov2Model")  # eager attention: returns probabilities
    pixels = torch.randn(1, 3, 56, 56)
    with count_launches() as launches, torch.no_grad():
        out = fast(pixels, output_attentions=True)
    assert launches["attention"] == 0 and len(out.attentions) == LAYERS
    with count_launches() as launches:
        fast(pixels).last_hidden_state.sum().backward()
    assert not launches
    assert fast.encoder.layer[0].attention.attention.query.weight.grad is not None


def test_optimize_rejects_other_models_and_is_idempotent():
    with pytest.raises(TypeError, match="takes a transformers DINOv2 model"):
        dinov2_fast.optimize(torch.nn.Linear(2, 2))
    config = dinov2_fast.Dinov2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=1)
    with pytest.raises(TypeError, match="fused already"):
        dinov2_fast.optimize(dinov2_fast.Dinov2Model(config))
    original, fast = _optimized_pair("Dinov2Model")
    dinov2_fast.optimize(fast)
    pixels = torch.randn(1, 3, 56, 56)
    with count_launches() as launches, torch.no_grad():
        out = fast(pixels).last_hidden_state
        assert rel_err(out, original(pixels).last_hidden_state) <= 1e-4
    assert launches["attention"] == LAYERS


def test_attention_implementation_by_name(tmp_path):
    original = hf_model("Dinov2Model", **HEAD64)
    original.save_pretrained(tmp_path)
    dinov2_fast.register_attention_implementation()
    named = transformers.Dinov2Model.from_pretrained(tmp_path, attn_implementation="dinov2_fast")
    pixels = torch.randn(2, 3, 56, 56)
    with count_launches() as launches, torch.no_grad():
        out = named(pixels).last_hidden_state
    assert launches == {"attention": LAYERS}
    with torch.no_grad():
        assert rel_err(out, original(pixels).last_hidden_state) <= 1e-4


def test_image_feature_extraction_pipeline_gives_the_same_features():
    original = hf_model("Dinov2Model", **HEAD64)
    processor = transformers.BitImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}
    )
    images = [
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (60 + 9 * i, 80, 3), np.uint8))
        for i in range(2)
    ]
    extract = transformers.pipeline(
        "image-feature-extraction", model=original, image_processor=processor
    )
    before = [torch.tensor(f) for f in extract(images)]
    dinov2_fast.optimize(original)
    with count_launches() as launches:
        after = [torch.tensor(f) for f in extract(images)]
    assert launches["attention"] == 2 * LAYERS
    for a, b in zip(after, before, strict=True):
        assert rel_err(a, b) <= 1e-4


def test_a_deep_copy_of_an_optimized_model_runs_its_own_weights():
    original, fast = _optimized_pair("Dinov2Model")
    student = copy.deepcopy(fast)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(1.5)
    pixels = torch.randn(1, 3, 56, 56)
    with count_launches() as launches, torch.no_grad():
        fused = student(pixels).last_hidden_state
    assert launches["attention"] == LAYERS
    student.train()
    unfused = student(pixels).last_hidden_state  # training: the class's own forward
    unfused.sum().backward()
    assert rel_err(fused, unfused) <= 1e-4
    assert student.encoder.layer[0].attention.attention.query.weight.grad is not None
    assert fast.encoder.layer[0].attention.attention.query.weight.grad is None
