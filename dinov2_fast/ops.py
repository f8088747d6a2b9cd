"""The fused ops: each runs its Triton kernel when it can, else its twin in ``reference``.

The Triton path applies when triton is installed, the tensors are on CUDA (or
``TRITON_INTERPRET=1`` runs kernels on the CPU), their dtypes are supported and no gradient
is needed (no backward kernels yet, so autograd always gets the reference's exact
gradients). ``use_backend("torch" | "triton" | "auto")`` forces a path for a block of code;
``DINOV2_FAST_BACKEND=torch`` forces the reference everywhere. Forcing ``"triton"`` where the
kernel cannot run raises instead of falling back silently.

The Triton paths are torch custom ops (``torch.ops.dinov2_fast.*``) with fake
implementations, so ``torch.compile(fullgraph=True)`` traces through them. Triton itself is
imported only when a kernel first runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Iterator

import torch

from . import reference
from .kernels._common import interpreting

__all__ = [
    "add_layerscale_layernorm",
    "attention",
    "attention_split",
    "current_backend",
    "gelu",
    "layer_norm",
    "swiglu",
    "triton_available",
    "use_backend",
]

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV_VAR = "DINOV2_FAST_BACKEND"

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Kept in step with kernels.attention.SUPPORTED_HEAD_DIMS (tests check): importing it here
# would import triton.
_ATTENTION_HEAD_DIMS = (32, 48, 64, 80, 96, 128)
# Innermost use_backend() last; empty means the environment variable (or "auto") decides.
_forced_backends: list[str] = []


def _check_backend(backend: str, source: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    return backend


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Force ``"torch"`` (reference), ``"triton"`` (kernels or an error) or ``"auto"`` inside
    the block; nests, and overrides ``DINOV2_FAST_BACKEND``."""
    _forced_backends.append(_check_backend(backend, "backend"))
    try:
        yield
    finally:
        _forced_backends.pop()


def current_backend() -> str:
    """The backend in force: the innermost ``use_backend``, else the environment variable."""
    return forced_backend() or "auto"


def forced_backend() -> str | None:
    """The backend forced by ``use_backend`` or ``DINOV2_FAST_BACKEND``, or None."""
    if _forced_backends:
        return _forced_backends[-1]
    backend = os.environ.get(BACKEND_ENV_VAR)
    return _check_backend(backend, BACKEND_ENV_VAR) if backend else None


def triton_available(device: torch.device | str) -> bool:
    """Whether Triton kernels can run on ``device``: triton is installed and the device is
    CUDA, or the Triton interpreter is on."""
    return _TRITON_INSTALLED and (torch.device(device).type == "cuda" or interpreting())


def _triton_blocker(tensors: list[torch.Tensor | None]) -> str | None:
    """Why the Triton kernel cannot take these floating-point inputs (None if it can)."""
    present = [t for t in tensors if t is not None]
    device = present[0].device
    if not _TRITON_INSTALLED:
        return "triton is not installed"
    if not triton_available(device):
        return f"inputs are on {device}; Triton needs CUDA or TRITON_INTERPRET=1"
    if any(t.device != device for t in present):
        return "inputs are on different devices"
    if any(t.dtype not in _FLOAT_DTYPES for t in present):
        return f"dtypes {sorted({str(t.dtype) for t in present})}; supported: {_FLOAT_DTYPES}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return "an input requires grad and the kernels have no backward yet"
    return None


def _use_triton(
    op: str, tensors: list[torch.Tensor | None], extra_blocker: str | None = None
) -> bool:
    backend = current_backend()
    if backend == "torch":
        return False
    blocker = _triton_blocker(tensors) or extra_blocker
    if blocker is None:
        return True
    if backend == "triton":
        raise RuntimeError(f"dinov2_fast.ops.{op}: backend 'triton' is forced but {blocker}")
    return False


# The custom ops: the Triton kernels seen by torch.compile as single opaque calls.


def _on_device_of(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device and its stream: make that ``t``'s."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("dinov2_fast::layer_norm", mutates_args=())
def _layer_norm_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    from .kernels import layernorm

    with _on_device_of(x):
        return layernorm.layer_norm(x, weight, bias, eps)


@_layer_norm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("dinov2_fast::add_layerscale_layernorm", mutates_args=())
def _add_layerscale_layernorm_op(
    residual: torch.Tensor,
    branch: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from .kernels import layernorm

    with _on_device_of(residual):
        return layernorm.add_layerscale_layernorm(residual, branch, scale, weight, bias, eps)


@_add_layerscale_layernorm_op.register_fake
def _(
    residual: torch.Tensor,
    branch: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    normed = residual.new_empty(residual.shape, dtype=branch.dtype)
    return residual.new_empty(residual.shape), normed


@torch.library.custom_op("dinov2_fast::swiglu", mutates_args=())
def _swiglu_op(x: torch.Tensor) -> torch.Tensor:
    from .kernels import swiglu

    with _on_device_of(x):
        return swiglu.swiglu(x)


@_swiglu_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op("dinov2_fast::gelu", mutates_args=())
def _gelu_op(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    from .kernels import gelu

    with _on_device_of(x):
        return gelu.gelu(x, bias)


@_gelu_op.register_fake
def _(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("dinov2_fast::attention", mutates_args=())
def _attention_op(
    qkv: torch.Tensor,
    num_heads: int,
    scale: float | None,
    head_scale: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    config: str = "",
) -> torch.Tensor:
    """``config``: an ``AttentionConfig`` name a plan chose, or "" for the autotuner."""
    from .kernels import attention

    with _on_device_of(qkv):
        out, _lse = attention.flash_attention(
            qkv, num_heads, scale, head_scale, cu_seqlens, max_seqlen,
            config=attention.AttentionConfig.from_name(config) if config else None,
        )  # fmt: skip
    return out


@_attention_op.register_fake
def _(
    qkv: torch.Tensor,
    num_heads: int,
    scale: float | None,
    head_scale: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    config: str = "",
) -> torch.Tensor:
    return qkv.new_empty((*qkv.shape[:-1], qkv.shape[-1] // 3))


@torch.library.custom_op("dinov2_fast::attention_split", mutates_args=())
def _attention_split_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None,
    head_scale: torch.Tensor | None,
) -> torch.Tensor:
    from .kernels import attention

    with _on_device_of(query):
        out, _lse = attention.flash_attention_split(query, key, value, scale, head_scale)
    return out


@_attention_split_op.register_fake
def _(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None,
    head_scale: torch.Tensor | None,
) -> torch.Tensor:
    batch, heads, tokens, head_dim = query.shape
    return query.new_empty((batch, tokens, heads, head_dim))


# The public functional API.


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """LayerNorm over the last dimension (fp32 statistics); result in ``x``'s dtype."""
    if _use_triton("layer_norm", [x, weight, bias]):
        return _layer_norm_op(x, weight, bias, eps)
    return reference.layer_norm(x, weight, bias, eps)


def add_layerscale_layernorm(
    residual: torch.Tensor,
    branch: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``new = residual + scale * branch`` (residual's dtype) and ``LayerNorm(new)`` (branch's
    dtype) in one pass over the residual stream."""
    if _use_triton("add_layerscale_layernorm", [residual, branch, scale, weight, bias]):
        return _add_layerscale_layernorm_op(residual, branch, scale, weight, bias, eps)
    return reference.add_layerscale_layernorm(residual, branch, scale, weight, bias, eps)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` from the packed ``[gate | up]`` last dimension."""
    if _use_triton("swiglu", [x]):
        return _swiglu_op(x)
    return reference.swiglu(x)


def gelu(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Exact (erf) GELU of ``x + bias`` in one pass (``bias`` for a bias-free fc1 GEMM; the
    model lets cuBLAS add fc1's bias in its epilogue and passes none)."""
    if _use_triton("gelu", [x, bias]):
        return _gelu_op(x, bias)
    return reference.gelu(x, bias)


def _attention_model_blocker(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the attention kernel cannot serve a model of this head_dim in this dtype on this
    device (None if it can): what the fused forward asks once per plan."""
    if head_dim not in _ATTENTION_HEAD_DIMS:
        return f"head_dim {head_dim} is not one of {_ATTENTION_HEAD_DIMS}"
    if dtype == torch.float32 and device.type == "cuda":
        # Exact fp32 products spill registers in every tile shape (kernels/report.py).
        return "float32 attention on CUDA runs PyTorch's SDPA; use float16 or bfloat16"
    return None


def _attention_kernel_blocker(
    inputs: list[torch.Tensor], head_dim: int, scale: float | None
) -> str | None:
    """Why the attention kernel cannot take valid arguments like these (None if it can)."""
    blocker = _attention_model_blocker(inputs[0].device, inputs[0].dtype, head_dim)
    if blocker is not None:
        return blocker
    if scale is not None and not 0 < scale < math.inf:
        return f"scale {scale} is not positive and finite"
    if any(t.stride(-1) != 1 and t.shape[-1] > 1 for t in inputs):
        return "an input is strided in its last dimension"
    return None


def _attention_blocker(
    qkv: torch.Tensor, num_heads: int, scale: float | None, cu_seqlens: torch.Tensor | None
) -> str | None:
    """Why the attention kernel cannot take these arguments (None if it can, or if they are
    invalid: then the kernel refuses them with the reference's own error)."""
    if qkv.dim() == 0 or num_heads < 1 or qkv.shape[-1] % (3 * num_heads):
        return None
    if cu_seqlens is not None and (
        cu_seqlens.dtype != torch.int32 or cu_seqlens.device != qkv.device
    ):
        return "cu_seqlens must be int32 on qkv's device"
    return _attention_kernel_blocker([qkv], qkv.shape[-1] // (3 * num_heads), scale)


def attention(
    qkv: torch.Tensor,
    num_heads: int,
    *,
    scale: float | None = None,
    head_scale: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Non-causal multi-head attention on the packed (B, N, 3*H*Dh) QKV projection, giving
    (B, N, H*Dh); see ``reference.attention`` for ``head_scale``, ``cu_seqlens`` and
    ``max_seqlen``. Both paths validate the arguments alike (``reference.check_attention_inputs``).

    With ``cu_seqlens``, pass ``max_seqlen`` (the longest sequence) to make the call CUDA-graph
    capturable; outside a capture ``cu_seqlens`` is still read on the host once to validate
    it.
    """
    if _use_triton(
        "attention", [qkv, head_scale], _attention_blocker(qkv, num_heads, scale, cu_seqlens)
    ):
        return _attention_op(qkv, num_heads, scale, head_scale, cu_seqlens, max_seqlen)
    return reference.attention(
        qkv,
        num_heads,
        scale=scale,
        head_scale=head_scale,
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
    )


def attention_split(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None = None,
    head_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Non-causal multi-head attention on separate (B, H, N, Dh) q, k, v, any strides with a
    contiguous last dim (transformers' attention-function layout), read in place; the result
    is (B, N, H, Dh). See ``reference.attention_split``."""
    if all(t.dim() == 4 for t in (query, key, value)):
        blocker = _attention_kernel_blocker([query, key, value], query.shape[-1], scale)
    else:
        blocker = None  # invalid: both paths refuse it with the same error
    if _use_triton("attention_split", [query, key, value, head_scale], blocker):
        return _attention_split_op(query, key, value, scale, head_scale)
    return reference.attention_split(query, key, value, scale=scale, head_scale=head_scale)
