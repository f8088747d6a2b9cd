"""Plain PyTorch twins of every fused op: the CPU path and the truth the kernels are tested against.

Each function has the signature and semantics of its entry in ``dinov2_fast.ops`` (whose
``attention`` also takes ``max_seqlen``, a launch hint of the kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["add_layerscale_layernorm", "attention", "gelu", "layer_norm", "swiglu"]


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """LayerNorm over the last dimension, in ``x``'s dtype (parameters are cast to it, as the
    kernel does for an fp32 residual stream with bf16 parameters)."""
    return F.layer_norm(x, x.shape[-1:], weight.to(x.dtype), bias.to(x.dtype), eps)


def add_layerscale_layernorm(
    residual: torch.Tensor,
    branch: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``new = residual + scale * branch`` and ``LayerNorm(new)``.

    ``new`` keeps the residual's dtype (an fp32 residual stream may take a bf16 branch);
    the normed output has the branch's dtype, ready for the next GEMM.
    """
    new_residual = residual + (scale * branch).to(residual.dtype)
    normed = layer_norm(new_residual, weight, bias, eps).to(branch.dtype)
    return new_residual, normed


def gelu(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Exact (erf) GELU of ``x + bias``, in ``x``'s dtype."""
    return F.gelu(x if bias is None else x + bias).to(x.dtype)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` from the packed ``[gate | up]`` last dimension."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def attention(
    qkv: torch.Tensor,
    num_heads: int,
    *,
    scale: float | None = None,
    head_scale: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Non-causal multi-head attention on the packed QKV projection.

    qkv is (B, N, 3*H*Dh), laid out ``[q | k | v]`` with heads contiguous inside each;
    the result is (B, N, H*Dh). With ``cu_seqlens`` (int32, (S+1,), starting at 0) qkv is
    (total, 3*H*Dh) and each sequence attends only within itself. ``head_scale`` multiplies
    each head's output: shape (H,) or (B, H) ((S, H) with cu_seqlens).
    """
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        outs = []
        for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=False)):
            seq_scale = None
            if head_scale is not None:
                seq_scale = head_scale if head_scale.dim() == 1 else head_scale[i]
            outs.append(
                attention(
                    qkv[start:end].unsqueeze(0), num_heads, scale=scale, head_scale=seq_scale
                )[0]
            )
        return torch.cat(outs, dim=0)
    batch, tokens, width = qkv.shape
    head_dim = width // (3 * num_heads)
    q, k, v = qkv.view(batch, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    if head_scale is not None:
        out = out * head_scale.reshape(-1, num_heads, 1, 1).to(out.dtype)
    return out.transpose(1, 2).reshape(batch, tokens, num_heads * head_dim)
