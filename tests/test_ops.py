"""The dispatch layer: which path runs, forcing it, autograd, errors and torch.compile."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from _numerics import assert_close_2x

from dinov2_fast import ops, reference
from dinov2_fast.kernels._common import count_launches

# Tier 1 runs kernels on CPU tensors; gpu-marked tests run natively (conftest.py).
pytestmark = pytest.mark.interpreter

EPS = 1e-6
DIM = 384


def _inputs(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Fresh random inputs for every op: a (2, 17, DIM) stream and DINOv2-small shapes."""
    return {
        "x": torch.randn(2, 17, DIM).to(dtype),
        "branch": torch.randn(2, 17, DIM).to(dtype),
        "scale": torch.randn(DIM).to(dtype),
        "weight": (1 + 0.5 * torch.randn(DIM)).to(dtype),
        "bias": torch.randn(DIM).to(dtype),
        "packed": torch.randn(2, 17, 2 * DIM).to(dtype),
        "qkv": torch.randn(2, 17, 3 * DIM).to(dtype),
    }


def _block(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every op once, the way a transformer block chains them."""
    new_residual, normed = ops.add_layerscale_layernorm(
        t["x"], t["branch"], t["scale"], t["weight"], t["bias"], EPS
    )
    attended = ops.attention(t["qkv"], 6)
    hidden = ops.gelu(normed, t["bias"]) + ops.swiglu(t["packed"])
    return ops.layer_norm(new_residual + attended + hidden, t["weight"], t["bias"], EPS)


def _reference_block(t: dict[str, torch.Tensor]) -> torch.Tensor:
    new_residual, normed = reference.add_layerscale_layernorm(
        t["x"], t["branch"], t["scale"], t["weight"], t["bias"], EPS
    )
    attended = reference.attention(t["qkv"], 6)
    hidden = reference.gelu(normed, t["bias"]) + reference.swiglu(t["packed"])
    return reference.layer_norm(new_residual + attended + hidden, t["weight"], t["bias"], EPS)


ALL_KERNELS = {
    "add_layerscale_layernorm": 1,
    "attention": 1,
    "gelu": 1,
    "swiglu": 1,
    "layer_norm": 1,
}


def test_auto_runs_every_kernel_under_the_interpreter() -> None:
    t = _inputs()
    with count_launches() as launches:
        out = _block(t)
    assert launches == ALL_KERNELS
    expected = _reference_block({k: v.double() for k, v in t.items()})
    assert_close_2x(out, expected, _reference_block(t), atol=1e-4)


def test_use_backend_torch_runs_no_kernel() -> None:
    t = _inputs()
    with ops.use_backend("torch"), count_launches() as launches:
        out = _block(t)
    assert not launches
    torch.testing.assert_close(out, _reference_block(t), rtol=0, atol=0)


def test_env_var_forces_torch_and_use_backend_overrides_it(monkeypatch) -> None:
    monkeypatch.setenv(ops.BACKEND_ENV_VAR, "torch")
    t = _inputs()
    with count_launches() as launches:
        _block(t)
    assert not launches
    with ops.use_backend("auto"), count_launches() as launches:
        _block(t)
    assert launches == ALL_KERNELS


def test_use_backend_nests_and_restores() -> None:
    assert ops.current_backend() == "auto"
    with ops.use_backend("torch"):
        with ops.use_backend("triton"):
            assert ops.current_backend() == "triton"
        assert ops.current_backend() == "torch"
    assert ops.current_backend() == "auto"


def test_bad_backend_names(monkeypatch) -> None:
    with pytest.raises(ValueError, match="backend"), ops.use_backend("cuda"):
        pass
    monkeypatch.setenv(ops.BACKEND_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=ops.BACKEND_ENV_VAR):
        ops.current_backend()


def test_auto_falls_back_on_unsupported_dtype_and_head_dim() -> None:
    t = _inputs(torch.float64)
    qkv16 = torch.randn(1, 5, 3 * 2 * 16)  # head_dim 16: no kernel
    with count_launches() as launches:
        out = _block(t)
        attended = ops.attention(qkv16, 2)
    assert not launches
    torch.testing.assert_close(out, _reference_block(t))
    torch.testing.assert_close(attended, reference.attention(qkv16, 2))


def test_attention_arguments_the_kernel_refuses_take_the_reference() -> None:
    qkv = torch.randn(2, 5, 3 * 2 * 32)
    cu_seqlens64 = torch.tensor([0, 4, 10])
    with count_launches() as launches:
        negative = ops.attention(qkv, 2, scale=-0.5)
        varlen = ops.attention(qkv.flatten(0, 1), 2, cu_seqlens=cu_seqlens64)
    assert not launches
    torch.testing.assert_close(negative, reference.attention(qkv, 2, scale=-0.5))
    expected = reference.attention(qkv.flatten(0, 1), 2, cu_seqlens=cu_seqlens64)
    torch.testing.assert_close(varlen, expected)
    with ops.use_backend("triton"), pytest.raises(RuntimeError, match="int32"):
        ops.attention(qkv.flatten(0, 1), 2, cu_seqlens=cu_seqlens64)


def test_forced_triton_raises_instead_of_falling_back() -> None:
    with ops.use_backend("triton"):
        with pytest.raises(RuntimeError, match="triton.*float64"):
            ops.swiglu(torch.randn(3, 8, dtype=torch.float64))
        with pytest.raises(RuntimeError, match="head_dim 16"):
            ops.attention(torch.randn(1, 5, 3 * 2 * 16), 2)
        with pytest.raises(RuntimeError, match="requires grad"):
            ops.gelu(torch.randn(3, 8, requires_grad=True))


def test_without_interpreter_cpu_takes_the_reference(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not ops.triton_available("cpu")
    assert ops.triton_available("cuda")
    with count_launches() as launches:
        _block(_inputs())
    assert not launches
    with ops.use_backend("triton"), pytest.raises(RuntimeError, match="CUDA or TRITON_INTERPRET"):
        ops.layer_norm(torch.randn(2, 8), torch.randn(8), torch.randn(8), EPS)


def test_autograd_takes_the_reference_with_exact_gradients() -> None:
    t = _inputs()
    leaves = {k: v.clone().requires_grad_() for k, v in t.items()}
    with count_launches() as launches:
        _block(leaves).pow(2).sum().backward()
    assert not launches
    doubles = {k: v.double().requires_grad_() for k, v in t.items()}
    _reference_block(doubles).pow(2).sum().backward()
    for name, leaf in leaves.items():
        torch.testing.assert_close(leaf.grad, doubles[name].grad.float(), rtol=1e-4, atol=1e-4)


def test_no_grad_uses_the_kernels_even_for_parameters() -> None:
    t = {k: v.requires_grad_() for k, v in _inputs().items()}
    with torch.no_grad(), count_launches() as launches:
        _block(t)
    assert launches == ALL_KERNELS


def test_attention_head_dims_match_the_kernel() -> None:
    from dinov2_fast.kernels import attention

    assert ops._ATTENTION_HEAD_DIMS == attention.SUPPORTED_HEAD_DIMS


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_torch_compile_fullgraph(backend: str) -> None:
    """Dynamo traces the dispatch, use_backend inside the graph and the custom ops whole."""
    torch._dynamo.reset()
    t = _inputs()

    def forward(t: dict[str, torch.Tensor]) -> torch.Tensor:
        with ops.use_backend(backend):
            return _block(t)

    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    with count_launches() as launches:
        out = compiled(t)
    assert launches == (ALL_KERNELS if backend == "triton" else {})
    assert ops.current_backend() == "auto"
    torch.testing.assert_close(out, _reference_block(t), rtol=1e-4, atol=1e-4)


def test_import_without_triton() -> None:
    """The package and the reference path work when triton cannot be imported."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, dinov2_fast, dinov2_fast.ops as ops\n"
        "assert not ops.triton_available('cuda')\n"
        "x = torch.randn(2, 8)\n"
        "ops.layer_norm(x, torch.randn(8), torch.randn(8), 1e-6)\n"
        "try:\n"
        "    with ops.use_backend('triton'):\n"
        "        ops.swiglu(x)\n"
        "except RuntimeError as e:\n"
        "    assert 'not installed' in str(e)\n"
        "else:\n"
        "    raise AssertionError('forced triton did not raise')\n"
        "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_dispatch_and_compile(dtype: torch.dtype) -> None:
    torch._dynamo.reset()
    t = {k: v.cuda() for k, v in _inputs(dtype).items()}
    compiled = torch.compile(_block, fullgraph=True)
    with count_launches() as launches:
        out = compiled(t)
    assert launches == ALL_KERNELS
    expected = _reference_block({k: v.double() for k, v in t.items()})
    assert_close_2x(out, expected, _reference_block(t), atol=1e-3)


# Attention: one validation for both paths, and q, k, v read in place.


def _cu(bounds: list[int]) -> torch.Tensor:
    return torch.tensor(bounds, dtype=torch.int32)


def _varlen(tokens: int = 10) -> torch.Tensor:
    return torch.randn(tokens, 3 * 2 * 32)  # two heads of 32


BAD_ATTENTION_CALLS = {
    "cu_seqlens-decreasing": lambda: ops.attention(_varlen(), 2, cu_seqlens=_cu([0, 6, 4, 10])),
    "cu_seqlens-short-of-total": lambda: ops.attention(_varlen(), 2, cu_seqlens=_cu([0, 3, 9])),
    "cu_seqlens-past-total": lambda: ops.attention(_varlen(), 2, cu_seqlens=_cu([0, 3, 12])),
    "cu_seqlens-not-from-0": lambda: ops.attention(_varlen(), 2, cu_seqlens=_cu([1, 4, 10])),
    "cu_seqlens-2d": lambda: ops.attention(_varlen(), 2, cu_seqlens=_cu([[0, 10]])),
    "cu_seqlens-one-bound": lambda: ops.attention(_varlen(), 2, cu_seqlens=_cu([0])),
    "max_seqlen-too-short": lambda: ops.attention(
        _varlen(), 2, cu_seqlens=_cu([0, 4, 10]), max_seqlen=5
    ),
    "head_scale-rows-varlen": lambda: ops.attention(
        _varlen(), 2, cu_seqlens=_cu([0, 4, 10]), head_scale=torch.rand(3, 2)
    ),
    "head_scale-rows-batched": lambda: ops.attention(
        _varlen(10).view(2, 5, -1), 2, head_scale=torch.rand(3, 2)
    ),
    "qkv-3d-with-cu_seqlens": lambda: ops.attention(
        _varlen(10).view(1, 10, -1), 2, cu_seqlens=_cu([0, 10])
    ),
    "width": lambda: ops.attention(_varlen().view(2, 5, -1), 5),
    "zero-heads": lambda: ops.attention(_varlen().view(2, 5, -1), 0),
    "split-shapes": lambda: ops.attention_split(
        torch.randn(1, 2, 5, 32), torch.randn(1, 2, 6, 32), torch.randn(1, 2, 5, 32)
    ),
    "split-head_scale": lambda: ops.attention_split(
        *(torch.randn(2, 2, 5, 32) for _ in range(3)), head_scale=torch.rand(3)
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_ATTENTION_CALLS))
def test_both_attention_paths_refuse_bad_inputs_with_one_error(name: str) -> None:
    messages = []
    for backend in ("torch", "triton"):
        with (
            ops.use_backend(backend),
            count_launches() as launches,
            pytest.raises(ValueError) as error,
        ):
            BAD_ATTENTION_CALLS[name]()
        assert not launches, f"{backend} launched on a bad input"
        messages.append(str(error.value))
    assert messages[0] == messages[1]


def test_strided_cu_seqlens_are_read_by_value_on_both_paths() -> None:
    qkv = _varlen()
    every_other = _cu([0, 99, 4, 99, 10])[::2]
    assert not every_other.is_contiguous()
    with count_launches() as launches:
        fast = ops.attention(qkv, 2, cu_seqlens=every_other)
    assert launches == {"attention": 1}
    with ops.use_backend("torch"):
        slow = ops.attention(qkv, 2, cu_seqlens=every_other)
    expected = reference.attention(qkv.double(), 2, cu_seqlens=_cu([0, 4, 10]))
    torch.testing.assert_close(slow.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.double(), expected, rtol=1e-4, atol=1e-5)


def _projection_views(batch: int = 2, tokens: int = 17, heads: int = 2) -> list[torch.Tensor]:
    """transformers' q, k, v: (B, H, N, Dh) views of three (B, N, H*Dh) projections."""
    return [
        torch.randn(batch, tokens, heads * 64).unflatten(-1, (heads, 64)).transpose(1, 2)
        for _ in range(3)
    ]


def _spy_on_split_kernel(monkeypatch) -> list[list[tuple[int, tuple[int, ...]]]]:
    """Record (data_ptr, strides) of the q, k, v each split launch receives."""
    from dinov2_fast.kernels import attention

    received = []
    launch = attention.flash_attention_split

    def spy(query, key, value, *args, **kwargs):
        received.append([(t.data_ptr(), t.stride()) for t in (query, key, value)])
        return launch(query, key, value, *args, **kwargs)

    monkeypatch.setattr(attention, "flash_attention_split", spy)
    return received


def test_attention_split_reads_the_views_in_place(monkeypatch) -> None:
    views = _projection_views()
    received = _spy_on_split_kernel(monkeypatch)
    with count_launches() as launches:
        out = ops.attention_split(*views, scale=0.1)
    assert launches == {"attention": 1}
    assert received == [[(t.data_ptr(), t.stride()) for t in views]]
    expected = reference.attention_split(*(t.double() for t in views), scale=0.1)
    assert out.shape == (2, 17, 2, 64)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def test_transformers_attention_function_makes_no_copy(monkeypatch) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from dinov2_fast.optimize import _transformers_attention

    module = torch.nn.Module().eval()
    module.is_causal = False
    views = _projection_views()
    expected, _ = sdpa_attention_forward(module, *views, None, scaling=0.125)
    received = _spy_on_split_kernel(monkeypatch)

    def no_copy(*args, **kwargs):
        raise AssertionError("q, k, v were copied")

    for name in ("stack", "cat"):
        monkeypatch.setattr(torch, name, no_copy)
    for name in ("contiguous", "reshape", "permute"):
        monkeypatch.setattr(torch.Tensor, name, no_copy)
    with count_launches() as launches:
        out, probs = _transformers_attention(module, *views, None, scaling=0.125)
    monkeypatch.undo()
    assert launches == {"attention": 1} and probs is None
    assert received == [[(t.data_ptr(), t.stride()) for t in views]]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_attention_split_compiles_fullgraph() -> None:
    torch._dynamo.reset()
    views = _projection_views()
    compiled = torch.compile(
        lambda q, k, v: ops.attention_split(q, k, v) * 2, fullgraph=True, backend="aot_eager"
    )
    with count_launches() as launches:
        out = compiled(*views)
    assert launches == {"attention": 1}
    torch.testing.assert_close(out, 2 * reference.attention_split(*views), rtol=1e-4, atol=1e-5)
