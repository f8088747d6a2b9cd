"""Original facebookresearch checkpoints against the original code (PyPI dinov2==0.0.1.dev2)."""

import pytest
import torch
import transformers

import dinov2_fast
from tests._models import randomize, rel_err

vision_transformer = pytest.importorskip("dinov2.models.vision_transformer")

TOL = 1e-5


def original_vit(ffn_layer="mlp", block_chunks=0, init_values=1e-5, seed=0):
    model = vision_transformer.DinoVisionTransformer(
        img_size=56,
        patch_size=14,
        embed_dim=128,
        depth=2,
        num_heads=2,
        init_values=init_values,
        ffn_layer=ffn_layer,
        block_chunks=block_chunks,
    )
    return randomize(model, seed).eval()


def assert_matches_original(ours, original, pixels):
    with torch.no_grad():
        ref = original.forward_features(pixels)
        out = ours(pixels, output_hidden_states=True)
    assert rel_err(out.pooler_output, ref["x_norm_clstoken"]) <= TOL
    assert rel_err(out.last_hidden_state[:, 1:], ref["x_norm_patchtokens"]) <= TOL
    assert rel_err(out.hidden_states[-1], ref["x_prenorm"]) <= TOL


LAYOUTS = {
    "hub-mlp": {},
    "hub-swiglu": {"ffn_layer": "swiglufused"},
    "block-chunks": {"block_chunks": 2},
    "no-layerscale": {"init_values": None},
}


@pytest.mark.parametrize(
    "size", [(56, 56), (70, 98), (84, 84)], ids=["native", "non-square", "larger"]
)
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_hub_checkpoints_match_original_forward_features(tmp_path, layout, size):
    original = original_vit(**layout)
    file = tmp_path / "dinov2_vits14.pth"
    torch.save(original.state_dict(), file)
    ours = dinov2_fast.Dinov2Model.from_original(file, backend="torch")
    assert ours.config.interpolate_offset == 0.1 and not ours.config.antialias
    assert ours.config.use_swiglu_ffn == (layout.get("ffn_layer") == "swiglufused")
    assert_matches_original(ours, original, torch.randn(2, 3, *size))


def test_training_checkpoint_with_teacher_and_prefixes():
    original = original_vit(block_chunks=2)
    teacher = {f"backbone.{k}": v for k, v in original.state_dict().items()}
    teacher["dino_head.mlp.0.weight"] = torch.randn(8, 128)
    checkpoint = {"teacher": {f"module.{k}": v for k, v in teacher.items()}, "iteration": 3}
    ours = dinov2_fast.Dinov2Model.from_original(checkpoint)
    assert_matches_original(ours, original, torch.randn(1, 3, 70, 56))


def test_register_checkpoints_use_the_antialiased_size_resize(tmp_path):
    """Original register models resize by size with antialias, as transformers does."""
    original = original_vit()
    state = dict(original.state_dict())
    state["register_tokens"] = torch.randn(1, 4, 128)
    ours = dinov2_fast.Dinov2Model.from_original(state)
    assert ours.config.num_register_tokens == 4 and ours.config.antialias
    assert ours.config.interpolate_offset == 0.0
    ours.save_pretrained(tmp_path)
    hf = transformers.Dinov2WithRegistersModel.from_pretrained(tmp_path).eval()
    pixels = torch.randn(2, 3, 70, 84)
    with torch.no_grad():
        out, ref = ours(pixels), hf(pixels)
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= TOL


def test_inferred_config_and_overrides():
    original = original_vit(ffn_layer="swiglufused")
    ours = dinov2_fast.Dinov2Model.from_original(original.state_dict(), dtype=torch.float16)
    config = ours.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (128, 2, 2)
    assert (config.image_size, config.patch_size, config.ffn_hidden_size) == (56, 14, 344)
    assert ours.dtype == torch.float16
    wider = dinov2_fast.Dinov2Model.from_original(original.state_dict(), num_attention_heads=4)
    assert wider.config.head_dim == 32


def test_original_checkpoint_errors(tmp_path):
    state = original_vit().state_dict()
    with pytest.raises(ValueError, match="cannot place.*blocks.0.attn.extra.weight"):
        dinov2_fast.Dinov2Model.from_original(
            {**state, "blocks.0.attn.extra.weight": torch.ones(1)}
        )
    trimmed = {k: v for k, v in state.items() if k != "blocks.1.norm1.bias"}
    with pytest.raises(ValueError, match="missing tensors.*encoder.layer.1.norm1.bias"):
        dinov2_fast.Dinov2Model.from_original(trimmed)
    with pytest.raises(ValueError, match="lacks 'cls_token'"):
        dinov2_fast.Dinov2Model.from_original({"weight": torch.ones(2)})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dinov2_fast.Dinov2Model.from_original(tmp_path / "missing.pth")
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read checkpoint file"):
        dinov2_fast.Dinov2Model.from_original(tmp_path / "bad.pth")


def test_the_model_owns_its_tensors_and_export_warns_about_the_offset(tmp_path):
    state = original_vit().state_dict()
    model = dinov2_fast.Dinov2Model.from_original(state)
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        before = model(pixels).last_hidden_state
        for tensor in state.values():
            tensor.zero_()
        assert torch.equal(model(pixels).last_hidden_state, before)
    with pytest.warns(UserWarning, match="interpolate_offset=0.1"):
        model.save_pretrained(tmp_path)
