"""Config fields checked at construction and at load: one-line errors naming the field, the
value and what is accepted, instead of NaN outputs or tracebacks deep in a forward."""

import json

import pytest
import torch
import transformers

import dinov2_fast
from dinov2_fast import Dinov2Config

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 56}


@pytest.mark.parametrize(
    "field,value,accepted",
    [
        ("layer_norm_eps", -1, "a number > 0"),
        ("layer_norm_eps", float("nan"), "a number > 0"),
        ("num_attention_heads", 0, "an int >= 1"),
        ("num_attention_heads", -4, "an int >= 1"),
        ("num_hidden_layers", -1, "an int >= 0"),
        ("hidden_size", "64", "an int >= 1"),
        ("hidden_size", None, "an int >= 1"),
        ("hidden_size", 64.0, "an int >= 1"),
        ("hidden_size", True, "an int >= 1"),
        ("mlp_ratio", 0, "a number > 0"),
        ("hidden_dropout_prob", 1.5, r"a probability in \[0, 1\]"),
        ("drop_path_rate", 1.0, r"a probability in \[0, 1\)"),
        ("image_size", [224, 224], "a single int"),
        ("num_channels", 0, "an int >= 1"),
        ("qkv_bias", "yes", "true or false"),
        ("num_register_tokens", -1, "an int >= 0"),
        ("interpolate_offset", -0.1, "a number >= 0"),
        ("interpolate_antialias", 1, "true, false or null"),
        ("output_hidden_states", None, "true or false"),
        ("num_labels", -2, "an int >= 0"),
        ("id2label", ["cat", "dog"], "a dict"),
    ],
)
def test_bad_field_is_named_with_value_and_accepted(field, value, accepted):
    with pytest.raises(ValueError, match=rf"^Dinov2Config: {field}=.* expected {accepted}") as err:
        Dinov2Config(**{**TINY, field: value})
    assert "\n" not in str(err.value)


def test_consistency_between_fields():
    with pytest.raises(ValueError, match="hidden_size=64 is not a multiple of"):
        Dinov2Config(**{**TINY, "num_attention_heads": 5})
    with pytest.raises(ValueError, match="image_size=10 is smaller than patch_size=14"):
        Dinov2Config(**{**TINY, "image_size": 10})
    with pytest.raises(ValueError, match="needs num_labels > 1"):
        Dinov2Config(num_labels=1, problem_type="single_label_classification")


def _write(folder, config):
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "config,message",
    [
        ([{"hidden_size": 64}], "holds a JSON list, not a config object"),
        ({**TINY, "hidden_size": "64"}, "hidden_size='64' is not accepted"),
        ({**TINY, "hidden_size": None}, "hidden_size=None is not accepted"),
        ({**TINY, "layer_norm_eps": -1}, "layer_norm_eps=-1 is not accepted"),
        ({**TINY, "num_attention_heads": 0}, "num_attention_heads=0 is not accepted"),
    ],
)
def test_bad_config_json_is_refused_at_load(tmp_path, config, message):
    folder = _write(tmp_path / "model", config)
    with pytest.raises(ValueError, match=message):
        Dinov2Config.from_pretrained(folder)
    with pytest.raises(ValueError, match=message):
        dinov2_fast.Dinov2Model.from_pretrained(folder)


def test_from_dict_refuses_a_non_dict():
    with pytest.raises(ValueError, match="must be a JSON object"):
        Dinov2Config.from_dict(["not", "a", "dict"])


def test_fields_set_after_construction_are_checked_when_a_model_is_built():
    config = Dinov2Config(**TINY)
    config.layer_norm_eps = -1.0
    with pytest.raises(ValueError, match="layer_norm_eps=-1.0 is not accepted"):
        dinov2_fast.Dinov2Model(config)


def test_every_released_size_and_transformers_default_validates():
    for size in ("small", "base", "large", "giant"):
        Dinov2Config.for_size(size).validate()
    Dinov2Config.from_dict(transformers.Dinov2Config().to_dict()).validate()
    Dinov2Config.from_dict(transformers.Dinov2WithRegistersConfig().to_dict()).validate()


def test_zero_layers_is_still_a_valid_model():
    model = dinov2_fast.Dinov2Model(Dinov2Config(**{**TINY, "num_hidden_layers": 0})).eval()
    assert model(torch.randn(1, 3, 56, 56)).last_hidden_state.shape == (1, 17, 64)
