"""torch.compile(fullgraph=True) through the fused path, and CUDA-graph replay."""

import copy

import pytest
import torch

import dinov2_fast
from dinov2_fast import fused
from dinov2_fast.kernels._common import count_launches
from tests._models import hf_model, randomize, rel_err

pytest.importorskip("triton")

HEAD64 = {"hidden_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2}


def _our_model():
    config = dinov2_fast.Dinov2Config(**HEAD64, image_size=56)
    return randomize(dinov2_fast.Dinov2Model(config)).eval()


@pytest.mark.interpreter
@torch.no_grad()
def test_fullgraph_compile_of_our_model_runs_the_kernels():
    model = _our_model()
    pixels = torch.randn(2, 3, 56, 70)
    expected = model.set_backend("torch")(pixels).last_hidden_state
    compiled = torch.compile(model.set_backend("triton"), fullgraph=True, backend="aot_eager")
    with count_launches() as launches:
        out = compiled(pixels).last_hidden_state
    assert launches["attention"] == 2 and launches["add_layerscale_layernorm"] == 4
    assert rel_err(out, expected) <= 1e-4


@pytest.mark.interpreter
@torch.no_grad()
def test_a_compiled_model_takes_a_second_batch_size():
    """Dynamo makes the batch symbolic on a recompile; the trace must not need it constant."""
    model = _our_model().set_backend("triton")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for batch in (1, 2, 3):
        pixels = torch.randn(batch, 3, 56, 56)
        with count_launches() as launches:
            out = compiled(pixels).last_hidden_state
        assert launches["attention"] == 2
        expected = model.set_backend("torch")(pixels).last_hidden_state
        model.set_backend("triton")
        assert rel_err(out, expected) <= 1e-4


@pytest.mark.interpreter
@torch.no_grad()
def test_fullgraph_compile_of_an_optimized_transformers_model():
    original = hf_model("Dinov2Model", **HEAD64)
    fast = dinov2_fast.optimize(copy.deepcopy(original))
    pixels = torch.randn(1, 3, 56, 56)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    with count_launches() as launches:
        out = compiled(pixels).last_hidden_state
    assert launches["attention"] == 2
    assert rel_err(out, original(pixels).last_hidden_state) <= 1e-4


def test_cuda_graph_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        dinov2_fast.cuda_graph(_our_model())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_graph_replay_equals_eager():
    model = _our_model().cuda().half()
    runner = dinov2_fast.cuda_graph(model, output_hidden_states=True)
    for shape in [(1, 3, 56, 56), (4, 3, 70, 42), (1, 3, 56, 56)]:
        pixels = torch.randn(shape, device="cuda", dtype=torch.half)
        replayed, eager = runner(pixels), model(pixels, output_hidden_states=True)
        assert rel_err(replayed.last_hidden_state, eager.last_hidden_state) <= 1e-6
        assert len(replayed.hidden_states) == 3
    first = runner(pixels).last_hidden_state
    runner(torch.randn_like(pixels))
    assert torch.equal(first, runner(pixels).last_hidden_state)  # not overwritten meanwhile
    attention = model.encoder.layer[0].attention.attention
    attention.key.weight.data = attention.key.weight.data * 2  # new storage: re-captures
    assert rel_err(runner(pixels).last_hidden_state, model(pixels).last_hidden_state) <= 1e-6
    model.embeddings.position_embeddings.data.mul_(0.5)  # in place: replay reads it live
    assert rel_err(runner(pixels).last_hidden_state, model(pixels).last_hidden_state) <= 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_graph_replays_a_list_of_image_sizes():
    """A packed list is captured per list of sizes; replay equals the eager packed forward,
    also after other lists filled the packing cache."""
    model = _our_model().cuda().half()
    runner = dinov2_fast.cuda_graph(model)
    sizes = [(56, 70), (42, 56), (56, 56)]

    def images():
        return [torch.randn(3, h, w, device="cuda", dtype=torch.half) for h, w in sizes]

    first = images()
    replayed, eager = runner(first), model(first)
    for got, expected in zip(replayed.last_hidden_state, eager.last_hidden_state, strict=True):
        assert rel_err(got, expected) <= 1e-6
    for extra in range(300):  # more lists than the cu_seqlens cache holds
        fused.Packing([1 + extra, 2], torch.device("cuda"))
    second = images()
    replayed, eager = runner(second), model(second)
    for got, expected in zip(replayed.last_hidden_state, eager.last_hidden_state, strict=True):
        assert rel_err(got, expected) <= 1e-6
    assert len(runner._graphs) == 1
