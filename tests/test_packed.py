"""Lists of images of different sizes in one forward (dinov2_fast.packed): each image's
outputs equal that image run alone, exactly on the PyTorch path and within the fused
path's tolerances on the Triton path, with one launch per fused op for the whole list."""

import pytest
import torch

import dinov2_fast
from dinov2_fast.kernels._common import count_launches
from tests._models import randomize, rel_err

pytest.importorskip("triton")

LAYERS = 2
TINY = {"hidden_size": 128, "num_attention_heads": 2, "num_hidden_layers": LAYERS, "image_size": 56}
SIZES = [(56, 56), (70, 42), (28, 98), (14, 14)]


def _model(kind="Dinov2Model", **fields):
    config = dinov2_fast.Dinov2Config(**{**TINY, **fields})
    return randomize(getattr(dinov2_fast, kind)(config)).eval()


def _images(dtype=torch.float32, sizes=SIZES):
    return [torch.randn(3, h, w, dtype=dtype) for h, w in sizes]


@pytest.mark.parametrize(
    "fields", [{}, {"num_register_tokens": 4}, {"use_swiglu_ffn": True}], ids=str
)
@torch.no_grad()
def test_each_image_equals_itself_alone_on_the_torch_path(fields):
    model = _model(**fields).set_backend("torch")
    images = _images()
    out = model(pixel_values=images, output_hidden_states=True)
    assert out.pooler_output.shape == (len(images), TINY["hidden_size"])
    prefix = 1 + fields.get("num_register_tokens", 0)
    for i, image in enumerate(images):
        alone = model(image[None], output_hidden_states=True)
        (h, w) = image.shape[1:]
        assert out.last_hidden_state[i].shape == (prefix + (h // 14) * (w // 14), 128)
        assert torch.equal(out.last_hidden_state[i], alone.last_hidden_state[0])
        assert torch.equal(out.pooler_output[i], alone.pooler_output[0])
        for layer in range(LAYERS + 1):
            assert torch.equal(out.hidden_states[layer][i], alone.hidden_states[layer][0])


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "dtype, tolerance", [(torch.float32, 1e-4), (torch.float16, 1e-2)], ids=["fp32", "fp16"]
)
@pytest.mark.parametrize("fields", [{}, {"num_register_tokens": 4}], ids=["plain", "registers"])
@torch.no_grad()
def test_the_fused_path_packs_the_list_into_one_launch_per_op(fields, dtype, tolerance):
    reference = _model(**fields).set_backend("torch")
    fast = _model(**fields).to(dtype).set_backend("triton")
    fast.load_state_dict(reference.state_dict())
    images = _images()
    with count_launches() as launches:
        out = fast(pixel_values=[image.to(dtype) for image in images], output_hidden_states=True)
    assert dict(launches) == {
        "layer_norm": 1,
        "attention": LAYERS,
        "add_layerscale_layernorm": 2 * LAYERS,
        "gelu": LAYERS,
    }
    for i, image in enumerate(images):
        alone = reference(image[None], output_hidden_states=True)
        assert rel_err(out.last_hidden_state[i], alone.last_hidden_state[0]) <= tolerance
        assert rel_err(out.pooler_output[i], alone.pooler_output[0]) <= tolerance
        for layer in range(LAYERS + 1):
            assert rel_err(out.hidden_states[layer][i], alone.hidden_states[layer][0]) <= tolerance


@pytest.mark.interpreter
@torch.no_grad()
def test_head_mask_and_masked_positions_apply_per_image():
    reference = _model(use_mask_token=True).set_backend("torch")
    fast = _model(use_mask_token=True).set_backend("triton")
    fast.load_state_dict(reference.state_dict())
    images = _images(sizes=[(56, 56), (42, 70)])
    masks = [torch.rand((h // 14) * (w // 14)) < 0.5 for h, w in [(56, 56), (42, 70)]]
    head_mask = torch.rand(LAYERS, 2)
    with count_launches() as launches:
        out = fast(pixel_values=images, bool_masked_pos=masks, head_mask=head_mask)
    assert launches["attention"] == LAYERS
    for image, mask, tokens in zip(images, masks, out.last_hidden_state, strict=True):
        alone = reference(image[None], bool_masked_pos=mask[None], head_mask=head_mask)
        assert rel_err(tokens, alone.last_hidden_state[0]) <= 1e-4


@pytest.mark.parametrize(
    "backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
)
@torch.no_grad()
def test_the_classifier_gives_one_row_of_logits_per_image(backend):
    model = _model("Dinov2ForImageClassification", num_labels=5).set_backend(backend)
    images = _images()
    logits = model(pixel_values=images).logits
    assert logits.shape == (len(images), 5)
    for i, image in enumerate(images):
        alone = model.set_backend("torch")(image[None]).logits[0]
        assert rel_err(logits[i], alone) <= 1e-4
        model.set_backend(backend)


@pytest.mark.parametrize(
    "backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
)
@pytest.mark.parametrize(
    "images, masks, error, message",
    [
        ([], None, ValueError, "empty list"),
        ([torch.randn(56, 56)], None, ValueError, r"each item is one \(C, H, W\) image"),
        ([torch.randn(3, 56, 56), torch.randn(1, 56, 56)], None, ValueError, "1 channels"),
        (
            [torch.randn(3, 56, 56), torch.randn(3, 56, 56).double()],
            None,
            ValueError,
            r"pixel_values\[1\] is torch.float64",
        ),
        ([torch.randn(3, 56, 10)], None, ValueError, "smaller than one 14x14 patch"),
        ([torch.randn(3, 56, 56).long()], None, TypeError, "floating-point"),
        ([torch.randn(3, 56, 56)], torch.zeros(1, 16, dtype=torch.bool), TypeError, "list of"),
        ([torch.randn(3, 56, 56)], [torch.zeros(15, dtype=torch.bool)], ValueError, r"\(16,\)"),
    ],
    ids=["empty", "2-D", "channels", "dtypes", "small", "integer", "mask-tensor", "mask-shape"],
)
def test_bad_lists_get_the_same_clear_error_on_both_paths(backend, images, masks, error, message):
    model = _model(use_mask_token=True).set_backend(backend)
    with pytest.raises(error, match=message):
        model(pixel_values=images, bool_masked_pos=masks)


@pytest.mark.parametrize(
    "backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
)
@torch.no_grad()
def test_the_backbone_gives_each_image_maps_of_its_own_grid(backend):
    model = _model("Dinov2Backbone", out_features=["stage1", "stage2"]).set_backend(backend)
    images = _images()
    maps = model(pixel_values=images).feature_maps
    assert len(maps) == 2
    for stage in maps:
        for (h, w), feature_map in zip(SIZES, stage, strict=True):
            assert feature_map.shape == (128, h // 14, w // 14)
    for i, image in enumerate(images):
        alone = model.set_backend("torch")(image[None]).feature_maps
        for stage, expected in zip(maps, alone, strict=True):
            assert rel_err(stage[i], expected[0]) <= 1e-4
        model.set_backend(backend)
