"""Tuning a plan on one block's real input: the candidates of each site, and their inputs.

``tune_layer`` builds every site's inputs from the first block (its own activations, so the
numerics check sees real magnitudes), lists the candidates that can run here, and hands them
to ``plan.choose``. Kept apart from ``fused`` so a forward imports none of it until a shape
is first tuned.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, plan, reference
from .fused import _block_parts, _executor, fused_block, packed_qkv
from .kernels._common import device_arch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def attention_candidates(device: torch.device, dtype: torch.dtype, head_dim: int) -> list[str]:
    """Attention implementations that can run on ``device``, the unfused one first."""
    names = ["sdpa"]
    if device.type == "cuda":
        names += [f"sdpa:{backend}" for backend in ("flash", "efficient", "cudnn")]
    if ops._attention_model_blocker(device, dtype, head_dim) is None:
        from .kernels import attention

        configs = attention.candidate_configs(device_arch(device), head_dim)
        names += [f"triton:{config.name}" for config in configs]
    return names


def ffn_candidates(
    kind: str, device: torch.device, dtype: torch.dtype, mlp: nn.Module
) -> list[str]:
    """FFN implementations for this FFN kind, the unfused one first."""
    if kind == "swiglu":
        return ["torch", "triton"]
    if kind != "gelu":
        return ["torch"]
    names = ["torch", "triton"]
    # cuBLASLt's GELU epilogue exists for 16-bit GEMMs with a bias; elsewhere it is not the
    # epilogue (the CPU computes exact erf after the GEMM), so it is no candidate there.
    if device.type == "cuda" and dtype in _LOW_PRECISION and mlp.fc1.bias is not None:
        names.append("epilogue")
    return names


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def _reference_ffn(kind: str, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The FFN in fp32 (inputs and weights upcast): the yardstick of the ffn site."""
    x = x.float()
    if kind == "swiglu":
        hidden = F.linear(x, _fp32(mlp.weights_in.weight), _fp32(mlp.weights_in.bias))
        return F.linear(
            reference.swiglu(hidden), _fp32(mlp.weights_out.weight), _fp32(mlp.weights_out.bias)
        )
    hidden = F.gelu(F.linear(x, _fp32(mlp.fc1.weight), _fp32(mlp.fc1.bias)))
    return F.linear(hidden, _fp32(mlp.fc2.weight), _fp32(mlp.fc2.bias))


@torch.no_grad()
def tune_layer(
    layers: Any,
    final_norm: nn.LayerNorm,
    hidden_states: torch.Tensor,
    kind: str,
    timer: plan.Timer,
) -> plan.PlanRecord:
    """Choose the plan for ``hidden_states``' shape on ``layers[0]`` (see ``plan.choose``)."""
    layer = layers[0]
    next_norm = layers[1].norm1 if len(layers) > 1 else final_norm
    device, dtype = hidden_states.device, hidden_states.dtype
    attention = layer.attention.attention
    heads, scale = attention.num_attention_heads, attention.scaling
    norm1, norm2 = layer.norm1, layer.norm2
    ls1 = layer.layer_scale1.lambda1
    dense = layer.attention.output.dense

    normed = reference.layer_norm(hidden_states, norm1.weight, norm1.bias, norm1.eps)
    weight, bias = packed_qkv(attention)
    qkv = F.linear(normed, weight, bias)
    branch = F.linear(reference.attention(qkv, heads, scale=scale), dense.weight, dense.bias)
    norm_args = (hidden_states, branch, ls1, norm2.weight, norm2.bias, norm2.eps)
    normed2 = reference.add_layerscale_layernorm(*norm_args)[1]

    def site_op(site: str, name: str) -> Any:
        run = _executor(plan.UNFUSED.replace(**{site: name}), kind, False)
        return {"attention": run.attention, "norm": run.add_norm, "ffn": run.ffn}[site]

    def attend(name: str) -> Any:
        op = site_op("attention", name)
        return lambda: op(qkv, heads, scale=scale)

    def add_norm(name: str) -> Any:
        op = site_op("norm", name)
        return lambda: op(*norm_args)

    parts = _block_parts(layer)

    def ffn(name: str) -> Any:
        op = site_op("ffn", name)
        return lambda: op(parts, normed2)

    head_dim = attention.attention_head_size
    sites = [
        plan.Site(
            "attention",
            {name: attend(name) for name in attention_candidates(device, dtype, head_dim)},
            "sdpa",
            lambda: reference.attention(qkv.float(), heads, scale=scale),
        ),
        plan.Site(
            "norm",
            {name: add_norm(name) for name in ("torch", "triton")},
            "torch",
            lambda: reference.add_layerscale_layernorm(
                *(_fp32(t) for t in norm_args[:5]), norm2.eps
            ),
        ),
        plan.Site(
            "ffn",
            {name: ffn(name) for name in ffn_candidates(kind, device, dtype, layer.mlp)},
            "torch",
            lambda: _reference_ffn(kind, layer.mlp, normed2),
        ),
    ]

    def block(chosen: plan.Plan) -> Any:
        run = _executor(chosen, kind, False)
        return lambda: fused_block(layer, run, hidden_states, normed, None, next_norm)

    return plan.choose(sites, block, timer)
