"""The transformers API that user code and libraries (peft, accelerate, lightning, pipelines)
call, on dinov2_fast's own classes, checked against transformers 5.17's behaviour."""

import json
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from transformers.backbone_utils import BackboneType

import dinov2_fast
from dinov2_fast import Dinov2Backbone, Dinov2Config, Dinov2ForImageClassification, Dinov2Model
from tests._models import TINY, hf_and_ours, hf_model, randomize, rel_err

KINDS = ["Dinov2Model", "Dinov2ForImageClassification", "Dinov2Backbone"]


def _tiny(cls=Dinov2Model, **fields):
    return randomize(cls(Dinov2Config(**{**TINY, **fields}))).eval()


def _pixels(batch=1, size=56):
    return torch.randn(batch, 3, size, size)


# -- Backbone stages ------------------------------------------------------------------------


def test_backbone_out_features_and_out_indices_stay_aligned_as_in_transformers():
    ours, hf = _tiny(Dinov2Backbone), hf_model("Dinov2Backbone")
    for setting in (
        ("out_indices", [-2, -1]),
        ("out_features", ["stage1", "stage2"]),
        ("out_features", None),
        ("out_indices", [0]),
    ):
        setattr(ours.config, *setting)
        setattr(hf.config, *setting)
        assert (ours.out_features, ours.out_indices) == (hf.out_features, hf.out_indices)
        assert ours.channels == hf.channels
        with torch.no_grad():
            assert len(ours(_pixels()).feature_maps) == len(ours.out_features)
    ours.out_features = ["stem", "stage2"]  # on the model too, as transformers' BackboneMixin
    assert ours.config.out_indices == [0, 2]
    with pytest.raises(ValueError, match="not stages"):
        ours.config.out_features = ["stage9"]
    with pytest.raises(ValueError, match="out of range"):
        ours.out_indices = [5]


def test_backbone_channels_and_type_match_transformers():
    ours, hf = (
        _tiny(Dinov2Backbone, out_indices=[1, 2]),
        hf_model("Dinov2Backbone", out_indices=[1, 2]),
    )
    assert ours.out_feature_channels == hf.out_feature_channels
    assert ours.backbone_type.value == hf.backbone_type.value == BackboneType.TRANSFORMERS.value
    assert ours.backbone_type == "transformers"


# -- Config-level output defaults -------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_config_output_defaults_apply_when_the_call_passes_none(tmp_path, kind):
    hf, ours = hf_and_ours(tmp_path, kind)
    pixels = _pixels()
    for model in (hf, ours):
        model.config.output_hidden_states = True
        model.config.output_attentions = True
    with torch.no_grad():
        ref, out = hf(pixels), ours(pixels)
    assert len(out.hidden_states) == len(ref.hidden_states) == TINY["num_hidden_layers"] + 1
    assert len(out.attentions) == len(ref.attentions)
    assert rel_err(out.attentions[-1], ref.attentions[-1]) <= 1e-5
    with torch.no_grad():
        assert ours(pixels, output_hidden_states=False).hidden_states is None  # the call wins
    # transformers 5.17's own models break with config.return_dict=False (its encoder then
    # returns a tuple to code that reads attributes); the tuple is its return_dict=False's.
    ours.config.return_dict = False
    with torch.no_grad():
        ref, out = hf(pixels, return_dict=False), ours(pixels)
    assert isinstance(out, tuple) and len(out) == len(ref)
    assert ours.config.use_return_dict is False


# -- from_pretrained options ----------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    """A transformers-saved classifier folder and the transformers model."""
    hf = hf_model("Dinov2ForImageClassification", num_labels=3)
    hf.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", hf


def test_dtype_spellings(saved):
    folder, _ = saved
    load = Dinov2ForImageClassification.from_pretrained
    assert load(folder, torch_dtype=torch.float16).dtype == torch.float16
    assert load(folder, dtype="bfloat16").dtype == torch.bfloat16
    assert load(folder, dtype="torch.float16").dtype == torch.float16
    assert load(folder, dtype="auto").dtype == torch.float32  # what config.json records
    for bad in ("int8", "half-ish", torch.int64, 3):
        with pytest.raises(ValueError, match=r"dtype=.* is not accepted; expected a floating"):
            load(folder, dtype=bad)
    with pytest.raises(ValueError, match="disagree"):
        load(folder, dtype=torch.float16, torch_dtype=torch.bfloat16)


def test_dtype_auto_reads_the_dtype_config_json_records(tmp_path):
    hf = hf_model().to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert Dinov2Model.from_pretrained(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16


def test_output_loading_info_has_transformers_keys(saved):
    folder, _ = saved
    _, ref_info = transformers.Dinov2ForImageClassification.from_pretrained(
        folder, output_loading_info=True
    )
    model, info = Dinov2ForImageClassification.from_pretrained(folder, output_loading_info=True)
    assert isinstance(model, Dinov2ForImageClassification)
    assert info.keys() == ref_info.keys()
    assert info == {
        "missing_keys": set(),
        "unexpected_keys": set(),
        "mismatched_keys": set(),
        "error_msgs": [],
    }


def test_ignore_mismatched_sizes_reinitialises_as_transformers(saved):
    folder, hf = saved
    with pytest.raises(ValueError, match="mis-shaped tensors classifier.bias: checkpoint"):
        Dinov2ForImageClassification.from_pretrained(folder, num_labels=5)
    _, ref_info = transformers.Dinov2ForImageClassification.from_pretrained(
        folder, num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True
    )
    with pytest.warns(UserWarning, match="newly initialised"):
        model, info = Dinov2ForImageClassification.from_pretrained(
            folder, num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True
        )
    assert {k for k, *_ in info["mismatched_keys"]} == {k for k, *_ in ref_info["mismatched_keys"]}
    assert ("classifier.weight", (3, 128), (5, 128)) in info["mismatched_keys"]
    assert model.classifier.weight.shape == (5, 128) and not model.classifier.weight.is_meta
    assert torch.equal(model.dinov2.layernorm.weight, hf.dinov2.layernorm.weight)
    with torch.no_grad():
        assert model(_pixels()).logits.shape == (1, 5)


def test_missing_head_is_reported_as_missing_keys(tmp_path):
    hf_model().save_pretrained(tmp_path / "body")
    with pytest.warns(UserWarning, match="no classifier head"):
        _, info = Dinov2ForImageClassification.from_pretrained(
            tmp_path / "body", output_loading_info=True
        )
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}


def test_devices_attention_and_no_op_options(saved):
    folder, _ = saved
    load = Dinov2ForImageClassification.from_pretrained
    for device_map in ("cpu", torch.device("cpu"), {"": "cpu"}, "auto"):
        model = load(folder, device_map=device_map, low_cpu_mem_usage=True)
        expected = torch.accelerator.current_accelerator() or torch.device("cpu")
        assert model.device.type == (expected.type if device_map == "auto" else "cpu")
    for device_map in ("balanced", {"dinov2": "cpu", "classifier": "meta"}):
        with pytest.raises(ValueError, match="device_map="):
            load(folder, device_map=device_map)
    with pytest.raises(ValueError, match="disagree"):
        load(folder, device="cpu", device_map="meta")
    model = load(
        folder, attn_implementation="eager", local_files_only=True, revision="main", cache_dir="x"
    )
    assert model.config._attn_implementation == "eager"
    with pytest.raises(
        ValueError, match="attn_implementation='flash_attention_2' is not supported"
    ):
        load(folder, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match=r"\['quantization_config'\] are not supported"):
        load(folder, quantization_config={"load_in_8bit": True})
    assert load(folder, output_hidden_states=True).config.output_hidden_states  # config fields


def test_hub_options_reach_the_hub_client(saved, monkeypatch):
    folder, _ = saved
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    Dinov2ForImageClassification.from_pretrained(
        "someone/dinov2-tiny", revision="v1", token="t", cache_dir="c", local_files_only=True
    )
    repo_id, kwargs = calls[0]
    assert repo_id == "someone/dinov2-tiny"
    assert (kwargs["revision"], kwargs["token"], kwargs["cache_dir"]) == ("v1", "t", "c")
    assert kwargs["local_files_only"] is True


def test_config_argument_and_state_dict_loading(saved):
    folder, hf = saved
    pixels = _pixels()
    with torch.no_grad():
        ref = hf(pixels).logits
    ours_config = Dinov2Config.from_pretrained(folder)
    for config in (ours_config, hf.config, folder, folder / "config.json"):
        model = Dinov2ForImageClassification.from_pretrained(folder, config=config)
        with torch.no_grad():
            assert rel_err(model(pixels).logits, ref) <= 1e-6
    assert model.config is not ours_config
    from_state = Dinov2ForImageClassification.from_pretrained(
        None, config=ours_config, state_dict=hf.state_dict()
    )
    with torch.no_grad():
        assert rel_err(from_state(pixels).logits, ref) <= 1e-6
    with pytest.raises(ValueError, match="needs config= and state_dict="):
        Dinov2Model.from_pretrained(None)
    with pytest.raises(ValueError, match="also needs config="):
        Dinov2Model.from_pretrained(None, state_dict=hf.state_dict())
    with pytest.raises(ValueError, match="not both"):
        Dinov2Model.from_pretrained(folder, config=ours_config, state_dict=hf.state_dict())
    with pytest.raises(TypeError, match="config must be a dinov2_fast.Dinov2Config"):
        Dinov2Model.from_pretrained(folder, config={"hidden_size": 64})


# -- Attention implementations -------------------------------------------------------------


def test_eager_attention_is_explicit_and_equals_sdpa(monkeypatch):
    model = _tiny()
    pixels = _pixels()
    assert model.config._attn_implementation == "dinov2_fast"
    with torch.no_grad():
        ref = model(pixels).last_hidden_state
    model.set_attn_implementation("eager")

    def refuse(*args, **kwargs):
        raise AssertionError("eager attention called F.scaled_dot_product_attention")

    monkeypatch.setattr(F, "scaled_dot_product_attention", refuse)
    with torch.no_grad():
        out = model(pixels, output_attentions=True)
    assert rel_err(out.last_hidden_state, ref) <= 1e-6
    assert out.attentions[0].shape == (1, TINY["num_attention_heads"], 17, 17)
    with pytest.raises(ValueError, match="is not supported; use one of"):
        model.set_attn_implementation("flash_attention_2")


@pytest.mark.parametrize("attn", ["eager", "sdpa", "dinov2_fast"])
def test_only_dinov2_fast_attention_takes_the_fused_path(attn):
    model = _tiny().set_backend("triton")
    model.set_attn_implementation(attn)
    with torch.no_grad():
        backend = model._fused_backend(_pixels(), output_attentions=False)
    assert backend == ("triton" if attn == "dinov2_fast" else None)


# -- Training helpers ------------------------------------------------------------------------


def test_gradient_checkpointing_api(monkeypatch):
    model = _tiny().train()
    assert not model.is_gradient_checkpointing
    seen = []
    real = dinov2_fast.modeling.checkpoint

    def spy(function, *args, **kwargs):
        seen.append(kwargs)
        return real(function, *args, **kwargs)

    monkeypatch.setattr(dinov2_fast.modeling, "checkpoint", spy)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert model.is_gradient_checkpointing
    model.enable_input_require_grads()  # reentrant checkpoints need an input that needs grad
    model(_pixels()).last_hidden_state.sum().backward()
    assert seen and all(kwargs == {"use_reentrant": True} for kwargs in seen)
    assert model.encoder.layer[0].attention.attention.query.weight.grad is not None
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_input_require_grads_hooks():
    model = _tiny().requires_grad_(False)
    assert not model(_pixels()).last_hidden_state.requires_grad
    model.enable_input_require_grads()
    assert model(_pixels()).last_hidden_state.requires_grad
    model.disable_input_require_grads()
    assert not model(_pixels()).last_hidden_state.requires_grad


@pytest.mark.parametrize("kind", KINDS)
def test_helpers_match_transformers(tmp_path, kind):
    hf, ours = hf_and_ours(tmp_path, kind)
    assert ours.num_parameters() == hf.num_parameters()
    assert ours.num_parameters(exclude_embeddings=True) == hf.num_parameters(
        exclude_embeddings=True
    )
    ours.get_input_embeddings().requires_grad_(False)
    hf.get_input_embeddings().requires_grad_(False)
    assert ours.num_parameters(only_trainable=True) == hf.num_parameters(only_trainable=True)
    assert type(ours.get_input_embeddings()).__name__ == type(hf.get_input_embeddings()).__name__
    assert ours.get_output_embeddings() is None and hf.get_output_embeddings() is None
    assert type(ours.base_model).__name__ == type(hf.base_model).__name__.replace(
        "WithRegisters", ""
    )
    assert ours.can_generate() is hf.can_generate() is False


def test_push_to_hub_uploads_the_saved_folder(monkeypatch):
    uploads = []

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            assert exist_ok
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            uploads.append((repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return "commit"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert _tiny().push_to_hub("me/tiny", token="t") == "commit"
    assert uploads == [("me/tiny", ["config.json", "model.safetensors"])]


def test_push_to_hub_without_huggingface_hub_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match="push_to_hub needs huggingface_hub: pip install"):
        _tiny().push_to_hub("me/tiny")


# -- Outputs ---------------------------------------------------------------------------------


def test_outputs_behave_like_transformers_model_output():
    model = _tiny()
    with torch.no_grad():
        ours = model(_pixels(), output_hidden_states=True)
    ref = transformers.modeling_outputs.BaseModelOutputWithPooling(**ours)
    assert list(ours.keys()) == list(ref.keys())
    assert [v is w for v, w in zip(ours.values(), ref.values(), strict=True)] == [True] * 3
    assert [k for k, _ in ours.items()] == [k for k, _ in ref.items()]
    assert ours.get("attentions") is ref.get("attentions") is None
    assert ours.get("attentions", 1) == ref.get("attentions", 1) == 1
    assert ours.get("pooler_output") is ours.pooler_output
    assert len(ours.to_tuple()) == len(ref.to_tuple()) == 3
    assert {**ours}.keys() == {**ref}.keys()
    assert list(ours) == list(ref)


# -- Config serialisation --------------------------------------------------------------------


def test_config_serialisation_like_transformers(tmp_path):
    config = Dinov2Config(**TINY, num_register_tokens=4, output_hidden_states=True)
    ref = transformers.Dinov2Config(**TINY, output_hidden_states=True)
    assert set(transformers.Dinov2Config().to_dict()) - set(config.to_dict()) <= {
        "architectures", "transformers_version", "dtype", "_name_or_path", "stage_names",
        "chunk_size_feed_forward", "is_encoder_decoder",
    }  # fmt: skip
    diff = json.loads(config.to_json_string())
    assert diff["hidden_size"] == 64 and diff["output_hidden_states"] is True
    assert "qkv_bias" not in diff  # a default
    assert json.loads(config.to_json_string(use_diff=False))["qkv_bias"] is True
    config.to_json_file(tmp_path / "ours.json")
    assert Dinov2Config.from_json_file(tmp_path / "ours.json") == config
    ref.to_json_file(tmp_path / "ref.json")
    loaded = Dinov2Config.from_json_file(tmp_path / "ref.json")
    assert (loaded.hidden_size, loaded.output_hidden_states) == (64, True)
    assert config.use_return_dict is ref.use_return_dict is True
    assert config != Dinov2Config(**TINY) and Dinov2Config(**TINY) == Dinov2Config(**TINY)
    config.save_pretrained(tmp_path / "folder")
    assert Dinov2Config.from_pretrained(tmp_path / "folder") == config
    assert transformers.AutoConfig.from_pretrained(tmp_path / "folder").output_hidden_states


# -- Pipelines ---------------------------------------------------------------------------------


def test_image_feature_extraction_pipeline_runs_our_model():
    model = _tiny()
    processor = transformers.BitImageProcessorPil(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}
    )
    extractor = transformers.pipeline(
        "image-feature-extraction", model=model, image_processor=processor
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 70, 3), np.uint8))
    with torch.no_grad():
        expected = model(**processor(image, return_tensors="pt"))
    features = extractor(image, return_tensors=True)
    assert rel_err(features, expected.last_hidden_state) <= 1e-6
    pooled = extractor(image, pool=True, return_tensors=True)
    assert rel_err(pooled, expected.pooler_output) <= 1e-6


# -- Inputs and caches -------------------------------------------------------------------------


def test_bool_masked_pos_as_a_list_is_a_clear_error():
    with pytest.raises(TypeError, match="bool_masked_pos must be a torch.Tensor of dtype bool"):
        _tiny()(_pixels(), bool_masked_pos=[[False] * 16])


def test_position_resize_cache_follows_the_interpolation_settings():
    model = _tiny()
    pixels = _pixels(size=84)  # 6x6 patches against a native 4x4 table: resized
    with torch.no_grad():
        model(pixels)
        for offset, antialias in ((0.1, False), (0.0, True)):
            model.config.interpolate_offset = offset
            model.config.interpolate_antialias = antialias
            fresh = Dinov2Model(
                Dinov2Config(**TINY, interpolate_offset=offset, interpolate_antialias=antialias)
            )
            fresh.load_state_dict(model.state_dict())
            assert (
                rel_err(model(pixels).last_hidden_state, fresh.eval()(pixels).last_hidden_state)
                == 0
            )


# -- Original checkpoints --------------------------------------------------------------------


def _original_state(hidden=64, layers=2, patch=14, grid=4):
    gen = torch.Generator().manual_seed(0)
    shapes = {
        "cls_token": (1, 1, hidden),
        "pos_embed": (1, grid * grid + 1, hidden),
        "mask_token": (1, hidden),
        "patch_embed.proj.weight": (hidden, 3, patch, patch),
        "patch_embed.proj.bias": (hidden,),
        "norm.weight": (hidden,),
        "norm.bias": (hidden,),
    }
    for i in range(layers):
        block = {
            "norm1.weight": (hidden,), "norm1.bias": (hidden,),
            "attn.qkv.weight": (3 * hidden, hidden), "attn.qkv.bias": (3 * hidden,),
            "attn.proj.weight": (hidden, hidden), "attn.proj.bias": (hidden,),
            "ls1.gamma": (hidden,), "norm2.weight": (hidden,), "norm2.bias": (hidden,),
            "mlp.fc1.weight": (4 * hidden, hidden), "mlp.fc1.bias": (4 * hidden,),
            "mlp.fc2.weight": (hidden, 4 * hidden), "mlp.fc2.bias": (hidden,),
            "ls2.gamma": (hidden,),
        }  # fmt: skip
        shapes.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return {k: torch.randn(v, generator=gen) * 0.1 for k, v in shapes.items()}


@pytest.mark.parametrize(
    "removed",
    ["blocks.1.attn.proj.weight", "blocks.1.attn.qkv.bias", "norm.bias"],
)
def test_original_missing_tensor_is_named_as_the_file_names_it(tmp_path, removed):
    state = _original_state()
    Dinov2Model.from_original(state)  # complete: loads
    del state[removed]
    file = tmp_path / "vit.pth"
    torch.save(state, file)
    with pytest.raises(ValueError, match=rf"missing tensors \['{removed}") as err:
        Dinov2Model.from_original(file)
    assert str(file) in str(err.value)
