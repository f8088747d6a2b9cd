"""The kernel suite's workloads: each fused op at a DINOv2 shape, and every way to run it.

``dinov2_fast.ops`` and ``dinov2_fast.reference`` name their functions alike and take the
same arguments, so a workload is one argument tuple that every provider accepts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dinov2_fast import ops, reference

from .cases import Case
from .harness import rotation_count

_SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
_EPS = 1e-6

Arguments = tuple[Any, ...]


@dataclass(frozen=True)
class Workload:
    """Argument tuples to rotate through (same parameters, distinct activations), the
    bytes one call reads and writes (memory-bound kernels) or its FLOPs (attention)."""

    arguments: list[Arguments]
    shape: str
    bytes_moved: int | None
    flops: float | None


def workload(case: Case, device: torch.device) -> Workload:
    """The case's arguments on ``device``, at the token count and widths of its model."""
    setting, kernel = case.setting, case.kernel
    config = setting.spec.config()
    batch, tokens, dtype = setting.batch, setting.tokens, setting.dtype
    width, heads, ffn = config.hidden_size, config.num_attention_heads, config.ffn_hidden_size
    element = torch.finfo(dtype).bits // 8

    def activation(last: int) -> torch.Tensor:
        return torch.randn(batch, tokens, last, device=device, dtype=dtype)

    def vector(mean: float) -> torch.Tensor:
        return mean + 0.1 * torch.randn(width, device=device, dtype=dtype)

    if kernel == "attention":
        per_call = batch * tokens * 3 * width * element
        arguments = [
            (activation(3 * width), heads) for _ in range(rotation_count(per_call, device))
        ]
        flops = 4 * batch * heads * tokens**2 * config.head_dim
        shape = f"B={batch} H={heads} N={tokens} d={config.head_dim}"
        return Workload(arguments, shape, None, flops)
    if kernel == "layer_norm":
        weight, bias = vector(1.0), vector(0.0)
        moved = 2 * batch * tokens * width * element
        make = lambda: (activation(width), weight, bias, _EPS)
        last = width
    elif kernel == "add_layerscale_layernorm":
        scale, weight, bias = vector(0.5), vector(1.0), vector(0.0)
        moved = 4 * batch * tokens * width * element
        make = lambda: (activation(width), activation(width), scale, weight, bias, _EPS)
        last = width
    elif kernel == "gelu":
        moved = 2 * batch * tokens * ffn * element
        make = lambda: (activation(ffn),)
        last = ffn
    elif kernel == "swiglu":
        moved = 3 * batch * tokens * ffn * element
        make = lambda: (activation(2 * ffn),)
        last = 2 * ffn
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    arguments = [make() for _ in range(rotation_count(moved, device))]
    return Workload(arguments, f"{batch}x{tokens}x{last}", moved, None)


def _xformers(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    import xformers.ops

    batch, tokens, width = qkv.shape
    query, key, value = qkv.view(batch, tokens, 3, heads, width // (3 * heads)).unbind(2)
    return xformers.ops.memory_efficient_attention(query, key, value).flatten(2)


def implementation(case: Case) -> Callable[[Arguments], Any]:
    """One call of the case's provider on an argument tuple."""
    twin = getattr(reference, case.kernel)
    provider = case.provider
    if provider == "dinov2_fast":
        fused = getattr(ops, case.kernel)

        def run(arguments: Arguments) -> Any:
            with ops.use_backend("triton"):
                return fused(*arguments)

        return run
    if provider == "torch":
        return lambda arguments: twin(*arguments)
    if provider == "torch-compile":
        compiled = torch.compile(twin, dynamic=False)
        return lambda arguments: compiled(*arguments)
    if provider in _SDPA_BACKENDS:

        def run_sdpa(arguments: Arguments) -> Any:
            with sdpa_kernel(_SDPA_BACKENDS[provider]):
                return twin(*arguments)

        return run_sdpa
    if provider == "xformers":
        return lambda arguments: _xformers(*arguments)
    raise ValueError(f"unknown kernel provider {provider!r}")


def fp32_reference(case: Case, arguments: Arguments) -> Any:
    """The reference twin in float32 on the same (upcast) arguments."""
    upcast = tuple(
        a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in arguments
    )
    return getattr(reference, case.kernel)(*upcast)
