"""fp32 parity of the PyTorch path with transformers 5.17 on random weights (<= 1e-5)."""

import pytest
import torch
import transformers

import dinov2_fast
from tests._models import hf_and_ours, hf_model, randomize, rel_err

TOL = 1e-5

VARIANTS = {
    "mlp": {},
    "swiglu": {"use_swiglu_ffn": True},
    "no-qkv-bias-eps-ratio": {"qkv_bias": False, "layer_norm_eps": 1e-5, "mlp_ratio": 2},
    "registers": {"registers": 4},
    "registers-swiglu": {"registers": 2, "use_swiglu_ffn": True},
}
SIZES = {"native": (56, 56), "non-square": (70, 42), "larger": (98, 84)}


def assert_outputs_match(ours, ref, fields):
    for field in fields:
        a, b = getattr(ours, field), getattr(ref, field)
        if isinstance(b, tuple):
            assert len(a) == len(b), field
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                assert rel_err(x, y) <= TOL, f"{field}[{i}]: {rel_err(x, y):.2e}"
        else:
            assert a.shape == b.shape, field
            assert rel_err(a, b) <= TOL, f"{field}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_model_matches_transformers(tmp_path, variant, size):
    hf, ours = hf_and_ours(tmp_path, "Dinov2Model", **variant)
    pixels = torch.randn(2, 3, *size)
    kwargs = {"output_hidden_states": True, "output_attentions": True}
    with torch.no_grad():
        ref, out = hf(pixels, **kwargs), ours(pixels, **kwargs)
    assert len(out.hidden_states) == ours.config.num_hidden_layers + 1
    assert_outputs_match(
        out, ref, ["last_hidden_state", "pooler_output", "hidden_states", "attentions"]
    )


@pytest.mark.parametrize("registers", [0, 4])
def test_bool_masked_pos(tmp_path, registers):
    hf, ours = hf_and_ours(tmp_path, "Dinov2Model", registers=registers)
    pixels = torch.randn(3, 3, 56, 70)
    mask = torch.rand(3, 4 * 5) < 0.5
    with torch.no_grad():
        ref, out = hf(pixels, bool_masked_pos=mask), ours(pixels, bool_masked_pos=mask)
        unmasked = ours(pixels)
    assert_outputs_match(out, ref, ["last_hidden_state"])
    assert rel_err(out.last_hidden_state, unmasked.last_hidden_state) > 1e-3


PROBLEMS = {
    "regression": (1, lambda b: torch.randn(b)),
    "single_label_classification": (5, lambda b: torch.randint(0, 5, (b,))),
    "multi_label_classification": (5, lambda b: (torch.rand(b, 5) < 0.5).float()),
}


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("problem", PROBLEMS, ids=PROBLEMS.keys())
def test_classifier_matches_transformers(tmp_path, problem, registers):
    num_labels, make_labels = PROBLEMS[problem]
    hf, ours = hf_and_ours(
        tmp_path, "Dinov2ForImageClassification", registers=registers, num_labels=num_labels
    )
    pixels, labels = torch.randn(4, 3, 56, 56), make_labels(4)
    with torch.no_grad():
        ref = hf(pixels, labels=labels, output_hidden_states=True)
        out = ours(pixels, labels=labels, output_hidden_states=True)
    assert ours.config.problem_type == hf.config.problem_type == problem
    assert_outputs_match(out, ref, ["logits", "loss", "hidden_states"])


def test_classifier_excludes_registers_from_the_patch_mean(tmp_path):
    _, ours = hf_and_ours(tmp_path, "Dinov2ForImageClassification", registers=4, num_labels=3)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        tokens = ours.dinov2(pixels).last_hidden_state
        expected = ours.classifier(torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=1))
        assert rel_err(ours(pixels).logits, expected) <= TOL


BACKBONES = {
    "last": {},
    "stages": {"out_features": ["stem", "stage1", "stage2"]},
    "indices-no-norm": {"out_indices": [0, 2], "apply_layernorm": False},
    "flat": {"out_indices": [1], "reshape_hidden_states": False},
}


@pytest.mark.parametrize("registers", [0, 2])
@pytest.mark.parametrize("fields", BACKBONES.values(), ids=BACKBONES.keys())
def test_backbone_matches_transformers(tmp_path, fields, registers):
    hf, ours = hf_and_ours(tmp_path, "Dinov2Backbone", registers=registers, **fields)
    pixels = torch.randn(2, 3, 70, 42)
    with torch.no_grad():
        ref, out = hf(pixels, output_hidden_states=True), ours(pixels, output_hidden_states=True)
    assert ours.out_features == hf.out_features
    assert_outputs_match(out, ref, ["feature_maps", "hidden_states"])
    if fields.get("reshape_hidden_states", True):
        assert out.feature_maps[0].shape == (2, 64, 5, 3)
    assert ours(pixels).hidden_states is None


def test_tuple_and_index_access(tmp_path):
    _, ours = hf_and_ours(tmp_path)
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        out = ours(pixels, output_hidden_states=True)
        as_tuple = ours(pixels, output_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3
    assert torch.equal(out[0], out.last_hidden_state) and torch.equal(out[1], out.pooler_output)
    assert torch.equal(out["pooler_output"], as_tuple[1])
    assert out[2] is out.hidden_states
    assert list(out.keys()) == ["last_hidden_state", "pooler_output", "hidden_states"]


def test_head_mask_scales_attention_probabilities(tmp_path):
    """transformers 4.x semantics: probs of head h in layer l are multiplied by mask[l, h]."""
    hf, ours = hf_and_ours(tmp_path)
    layers, heads, head_dim = 2, 4, 16
    head_mask = torch.rand(layers, heads)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = ours(pixels, head_mask=head_mask, output_attentions=True)
        plain = ours(pixels)
        # Scaling a head's probabilities scales its context, i.e. its columns of the output
        # projection: the same model with those columns scaled needs no head_mask.
        for layer, scales in zip(hf.encoder.layer, head_mask, strict=True):
            weight = layer.attention.output.dense.weight
            weight.mul_(scales.repeat_interleave(head_dim))
        ref = hf(pixels, output_attentions=True)
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= TOL
    for layer in range(layers):
        expected = ref.attentions[layer] * head_mask[layer].view(1, heads, 1, 1)
        assert rel_err(out.attentions[layer], expected) <= TOL
    same = ours(pixels, head_mask=torch.ones(heads)).last_hidden_state
    assert rel_err(same, plain.last_hidden_state) == 0


def test_position_table_follows_every_weight_change(tmp_path):
    hf, ours = hf_and_ours(tmp_path)
    pixels = torch.randn(1, 3, 70, 84)
    with torch.no_grad():
        ours(pixels)
        assert len(ours.embeddings._resize_cache) == 1
        for model in (hf, ours):
            # Writes through .data bypass version counters: an EMA teacher update does this.
            model.embeddings.position_embeddings.data.mul_(2)
        assert rel_err(ours(pixels).last_hidden_state, hf(pixels).last_hidden_state) <= TOL
    grads = []
    for model in (hf, ours):
        model(pixels).last_hidden_state.square().sum().backward()
        grads.append(model.embeddings.position_embeddings.grad)
    assert rel_err(grads[1], grads[0]) <= TOL


def test_save_pretrained_loads_in_transformers(tmp_path):
    for kind, registers in [
        ("Dinov2Model", 0),
        ("Dinov2Model", 4),
        ("Dinov2ForImageClassification", 4),
        ("Dinov2Backbone", 0),
    ]:
        config = dinov2_fast.Dinov2Config(
            **{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
            image_size=56,
            num_register_tokens=registers,
            num_labels=3,
            out_indices=[1, 2],
        )
        ours = randomize(getattr(dinov2_fast, kind)(config)).eval()
        folder = tmp_path / f"{kind}-{registers}"
        ours.save_pretrained(folder)
        hf = getattr(
            transformers, kind.replace("Dinov2", "Dinov2WithRegisters") if registers else kind
        )
        hf, info = hf.from_pretrained(folder, output_loading_info=True)
        assert not any(info.values()), info
        hf.eval()
        pixels = torch.randn(2, 3, 56, 70)
        with torch.no_grad():
            ref, out = hf(pixels), ours(pixels)
        field = {"Dinov2Model": "last_hidden_state", "Dinov2Backbone": "feature_maps"}
        assert_outputs_match(out, ref, [field.get(kind, "logits")])
        reloaded = getattr(dinov2_fast, kind).from_pretrained(folder)
        assert reloaded.config == ours.config


def test_hf_model_helper_randomizes_every_parameter():
    model = hf_model("Dinov2Model")
    for name, param in model.named_parameters():
        assert param.std() > 0.02, name


def test_classifier_takes_labels_second_as_in_transformers(tmp_path):
    hf, ours = hf_and_ours(tmp_path, "Dinov2ForImageClassification", num_labels=4)
    pixels, labels = torch.randn(4, 3, 56, 56), torch.randint(0, 4, (4,))
    with torch.no_grad():
        assert rel_err(ours(pixels, labels).loss, hf(pixels, labels).loss) <= TOL
