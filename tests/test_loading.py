"""Checkpoint folders in every layout transformers writes, and the errors of bad ones."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import dinov2_fast
from tests._models import hf_and_ours, hf_model, rel_err


def _outputs_equal(a, b, pixels):
    with torch.no_grad():
        return rel_err(a(pixels).last_hidden_state, b(pixels).last_hidden_state) <= 1e-6


def _rewrite_weights(folder, transform):
    file = folder / "model.safetensors"
    save_file(transform(load_file(file)), file, metadata={"format": "pt"})


def _to_518_names(state):
    """The in-memory names of transformers >= 5.18 (q/k/v/o_proj, gate/up/down_proj)."""
    out = {}
    for key, tensor in state.items():
        key = re.sub(
            r"attention\.attention\.(query|key|value)\.",
            lambda m: f"attention.{m[1][0]}_proj.",
            key,
        )
        key = key.replace("attention.output.dense.", "attention.o_proj.")
        if ".mlp.weights_in." in key:
            gate, up = tensor.chunk(2, dim=0)
            out[key.replace("weights_in", "gate_proj")] = gate
            out[key.replace("weights_in", "up_proj")] = up
            continue
        out[key.replace("mlp.weights_out.", "mlp.down_proj.")] = tensor
    return out


@pytest.mark.parametrize("swiglu", [False, True])
def test_transformers_518_in_memory_names(tmp_path, swiglu):
    hf, ours = hf_and_ours(tmp_path, use_swiglu_ffn=swiglu)
    _rewrite_weights(tmp_path / "hf", _to_518_names)
    assert any("q_proj" in k for k in load_file(tmp_path / "hf" / "model.safetensors"))
    renamed = dinov2_fast.Dinov2Model.from_pretrained(tmp_path / "hf")
    assert _outputs_equal(renamed, ours, torch.randn(1, 3, 56, 56))


def test_sharded_safetensors_and_pytorch_bin(tmp_path):
    hf = hf_model()
    pixels = torch.randn(1, 3, 56, 56)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sharded = dinov2_fast.Dinov2Model.from_pretrained(tmp_path / "sharded")
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(hf.state_dict(), binary / "pytorch_model.bin")
    from_bin = dinov2_fast.Dinov2Model.from_pretrained(binary)
    assert _outputs_equal(sharded, from_bin, pixels)
    with torch.no_grad():
        assert rel_err(sharded(pixels).last_hidden_state, hf(pixels).last_hidden_state) <= 1e-5


def test_dtype_device_and_backend_arguments(tmp_path):
    hf_model().save_pretrained(tmp_path)
    model = dinov2_fast.Dinov2Model.from_pretrained(
        tmp_path, dtype=torch.bfloat16, device="cpu", backend="torch"
    )
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert model.backend == "torch" and not model.training
    out = model(torch.randn(1, 3, 56, 56))
    assert out.last_hidden_state.dtype == torch.bfloat16


def test_classifier_from_a_backbone_checkpoint_warns_and_initialises_the_head(tmp_path):
    hf_model().save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"classifier\.weight.*newly initialised"):
        model = dinov2_fast.Dinov2ForImageClassification.from_pretrained(tmp_path, num_labels=7)
    assert model.classifier.weight.shape == (7, 128)
    assert torch.isfinite(model(torch.randn(1, 3, 56, 56)).logits).all()


def test_model_from_a_classifier_checkpoint_names_the_ignored_head(tmp_path):
    hf, _ = hf_and_ours(tmp_path, "Dinov2ForImageClassification", num_labels=3)
    with pytest.warns(UserWarning, match=r"ignoring the classifier head"):
        model = dinov2_fast.Dinov2Model.from_pretrained(tmp_path / "hf")
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert rel_err(model(pixels).last_hidden_state, hf.dinov2(pixels).last_hidden_state) <= 1e-5


BROKEN = {
    "missing": (
        lambda s: {k: v for k, v in s.items() if "layer.1.norm2.bias" not in k},
        "missing tensors.*encoder.layer.1.norm2.bias",
    ),
    "unexpected": (
        lambda s: {**s, "encoder.layer.9.norm1.weight": torch.ones(64)},
        "unexpected tensors.*encoder.layer.9.norm1.weight",
    ),
    "mis-shaped": (
        lambda s: {**s, "layernorm.weight": torch.ones(65)},
        r"mis-shaped tensors layernorm.weight: checkpoint \(65,\), model \(64,\)",
    ),
}


@pytest.mark.parametrize("transform,message", BROKEN.values(), ids=BROKEN.keys())
def test_a_partial_load_never_passes(tmp_path, transform, message):
    hf_model().save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, transform)
    with pytest.raises(ValueError, match=message):
        dinov2_fast.Dinov2Model.from_pretrained(tmp_path)


def test_config_that_disagrees_with_the_weights(tmp_path):
    hf_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="missing tensors.*encoder.layer.2"):
        dinov2_fast.Dinov2Model.from_pretrained(tmp_path, num_hidden_layers=3)


def test_unreadable_and_absent_files(tmp_path, monkeypatch):
    hf_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read checkpoint file"):
        dinov2_fast.Dinov2Model.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in"):
        dinov2_fast.Dinov2Model.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dinov2_fast.Dinov2Model.from_pretrained(tmp_path / "nowhere")
    import huggingface_hub

    def unreachable(repo_id, **kwargs):
        raise OSError(f"cannot reach the hub for {repo_id}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(FileNotFoundError, match="could not be fetched from the hub.*cannot reach"):
        dinov2_fast.Dinov2Model.from_pretrained("facebook/dinov2-small")


def test_config_json_errors(tmp_path):
    hf_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
    with pytest.raises(ValueError, match="model_type 'vit' is not a DINOv2 config"):
        dinov2_fast.Dinov2Model.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        dinov2_fast.Dinov2Model.from_pretrained(tmp_path)


def test_bf16_checkpoint_with_a_fresh_head_keeps_one_dtype(tmp_path):
    hf_model().to(torch.bfloat16).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="newly initialised"):
        model = dinov2_fast.Dinov2ForImageClassification.from_pretrained(tmp_path, num_labels=2)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(torch.randn(1, 3, 56, 56)).logits.dtype == torch.bfloat16


def test_config_overrides_on_saved_folders(tmp_path):
    hf, _ = hf_and_ours(tmp_path, "Dinov2ForImageClassification", num_labels=3)
    relabelled = dinov2_fast.Dinov2ForImageClassification.from_pretrained(
        tmp_path / "hf", num_labels=3, id2label={0: "cat", 1: "dog", 2: "fox"}
    )
    assert relabelled.config.id2label[2] == "fox"
    backbone_folder = tmp_path / "backbone"
    hf_model("Dinov2Backbone", out_indices=[1, 2]).save_pretrained(backbone_folder)
    backbone = dinov2_fast.Dinov2Backbone.from_pretrained(backbone_folder, out_features=["stem"])
    assert (backbone.out_features, backbone.out_indices) == (["stem"], [0])
    with pytest.raises(TypeError, match=r"\['hiden_size'\] are not Dinov2Config fields"):
        dinov2_fast.Dinov2Model.from_pretrained(backbone_folder, hiden_size=64)
