"""Config fields and defaults versus transformers, and clear errors for bad inputs."""

import json

import pytest
import torch
import transformers

import dinov2_fast
from dinov2_fast import Dinov2Config

HF_FIELDS = [
    "hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range",
    "layer_norm_eps", "image_size", "patch_size", "num_channels", "qkv_bias",
    "layerscale_value", "drop_path_rate", "use_swiglu_ffn", "out_features", "out_indices",
    "apply_layernorm", "reshape_hidden_states", "use_mask_token", "num_labels", "id2label",
    "label2id", "problem_type", "stage_names",
]  # fmt: skip


def test_defaults_equal_transformers():
    ours, ref = Dinov2Config(), transformers.Dinov2Config()
    for field in HF_FIELDS:
        assert getattr(ours, field) == getattr(ref, field), field
    assert ours.num_register_tokens == 0 and ours.interpolate_offset == 0.0
    registers = dinov2_fast.Dinov2WithRegistersConfig()
    ref = transformers.Dinov2WithRegistersConfig()
    assert (registers.num_register_tokens, registers.patch_size) == (
        ref.num_register_tokens,
        ref.patch_size,
    )


def test_stage_selection_matches_transformers():
    for kwargs in [{"out_indices": [0, -1]}, {"out_features": ["stage1", "stage3"]}, {}]:
        ours = Dinov2Config(num_hidden_layers=4, **kwargs)
        ref = transformers.Dinov2Config(num_hidden_layers=4, **kwargs)
        assert (ours.out_features, ours.out_indices) == (ref.out_features, ref.out_indices)
    with pytest.raises(ValueError, match="not stages"):
        Dinov2Config(num_hidden_layers=2, out_features=["stage7"])
    with pytest.raises(ValueError, match="name different stages"):
        Dinov2Config(num_hidden_layers=2, out_features=["stage1"], out_indices=[2])
    for stages in (["stage2", "stem"], ["stage1", "stage1"]):
        with pytest.raises(ValueError, match="distinct stages in the order"):
            Dinov2Config(num_hidden_layers=2, out_features=stages)


def test_round_trip_and_transformers_config_json(tmp_path):
    config = Dinov2Config(
        hidden_size=96, num_attention_heads=3, num_register_tokens=4, num_labels=3, out_indices=[2]
    )
    config.save_pretrained(tmp_path)
    assert Dinov2Config.from_pretrained(tmp_path) == config
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == (
        "dinov2_with_registers"
    )
    ref = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(ref).__name__ == "Dinov2WithRegistersConfig"
    assert (ref.num_register_tokens, ref.num_labels, ref.out_indices) == (4, 3, [2])
    transformers.Dinov2WithRegistersConfig(hidden_size=64, num_attention_heads=2).save_pretrained(
        tmp_path / "hf"
    )
    loaded = Dinov2Config.from_pretrained(tmp_path / "hf")
    assert (loaded.num_register_tokens, loaded.patch_size, loaded.antialias) == (4, 16, True)


def test_for_size():
    giant = Dinov2Config.for_size("giant")
    assert (giant.hidden_size, giant.num_hidden_layers, giant.ffn_hidden_size) == (1536, 40, 4096)
    assert Dinov2Config.for_size("base", patch_size=16).patch_size == 16
    with pytest.raises(ValueError, match="unknown DINOv2 size 'huge'"):
        Dinov2Config.for_size("huge")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"hidden_size": 100, "num_attention_heads": 3}, "not a multiple"),
        ({"hidden_act": "tanh"}, "hidden_act='tanh' is not accepted"),
        ({"problem_type": "ranking"}, "problem_type='ranking' is not accepted"),
        ({"num_labels": 3, "id2label": {0: "a"}}, "disagrees with id2label"),
        ({"patch_size": (14, 14)}, "single int"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Dinov2Config(**kwargs)


@pytest.fixture(scope="module")
def model():
    config = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56)
    return dinov2_fast.Dinov2Model(config).eval()


@pytest.mark.parametrize(
    "pixels,kwargs,error,message",
    [
        (torch.randn(1, 4, 56, 56), {}, ValueError, "has 4 channels; this model expects 3"),
        (torch.randn(3, 56, 56), {}, ValueError, "must be 4-D"),
        (torch.randn(1, 3, 10, 56), {}, ValueError, "smaller than one 14x14 patch"),
        (torch.zeros(1, 3, 56, 56, dtype=torch.uint8), {}, TypeError, "floating tensor"),
        ("pixels.png", {}, TypeError, "must be a torch.Tensor"),
        ([[0.0]], {}, TypeError, r"pixel_values\[0\] is a list; pass a non-empty list of"),
        (
            torch.randn(2, 3, 56, 56),
            {"bool_masked_pos": torch.zeros(2, 15, dtype=torch.bool)},
            ValueError,
            r"shape \(2, 16\)",
        ),
        (
            torch.randn(2, 3, 56, 56),
            {"bool_masked_pos": torch.zeros(2, 16)},
            ValueError,
            "must be a bool tensor",
        ),
        (
            torch.randn(1, 3, 56, 56),
            {"head_mask": torch.ones(3)},
            ValueError,
            r"\(4,\) or \(2, 4\)",
        ),
        (torch.randn(1, 3, 56, 56), {"head_mask": torch.ones(3, 4)}, ValueError, "head_mask"),
    ],
)
def test_input_errors(model, pixels, kwargs, error, message):
    with pytest.raises(error, match=message):
        model(pixels, **kwargs)


def test_mask_without_mask_token_is_an_error():
    config = Dinov2Config(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, use_mask_token=False
    )
    model = dinov2_fast.Dinov2Model(config)
    assert not hasattr(model.embeddings, "mask_token")
    with pytest.raises(ValueError, match="use_mask_token=False"):
        model(torch.randn(1, 3, 28, 28), bool_masked_pos=torch.zeros(1, 4, dtype=torch.bool))


def test_backend_names(model):
    with pytest.raises(ValueError, match="backend must be one of"):
        model.set_backend("cuda")
    assert model.set_backend("torch").backend == "torch"
