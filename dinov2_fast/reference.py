"""Plain PyTorch twins of every fused op: the CPU path and the truth the kernels are tested against.

Each function has the signature and semantics of its entry in ``dinov2_fast.ops``. The
``check_*`` functions are the validation the Triton launchers share, so both paths refuse
the same inputs with the same errors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "add_layerscale_layernorm",
    "attention",
    "attention_split",
    "check_attention_inputs",
    "check_split_attention_inputs",
    "gelu",
    "layer_norm",
    "swiglu",
]


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


def _check_head_scale(
    head_scale: torch.Tensor | None, groups: int, num_heads: int, device: torch.device
) -> None:
    if head_scale is None:
        return
    allowed = [(num_heads,), (groups, num_heads)]
    if tuple(head_scale.shape) not in allowed:
        raise ValueError(
            f"head_scale must have shape {allowed[0]} or {allowed[1]}, "
            f"got {tuple(head_scale.shape)}"
        )
    if not head_scale.is_floating_point() or head_scale.device != device:
        raise ValueError("head_scale must be a floating-point tensor on the inputs' device")


def _check_bounds(bounds: list[int], total: int, max_seqlen: int | None) -> None:
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at total={total}, got {bounds[0]}..{bounds[-1]}"
        )
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if min(lengths) < 0:
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
    if max_seqlen is not None and max(lengths) > max_seqlen:
        # The kernel's grid is sized by max_seqlen: a longer sequence would be left unwritten.
        raise ValueError(f"a sequence has {max(lengths)} tokens, more than max_seqlen={max_seqlen}")


def check_attention_inputs(
    qkv: torch.Tensor,
    num_heads: int,
    head_scale: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    *,
    read_bounds: bool = True,
    bounds: Sequence[int] | None = None,
) -> tuple[int, list[int] | None]:
    """Refuse attention arguments that mean nothing; return (head_dim, cu_seqlens as a list).

    The one validation of ``attention`` shared by this reference and the Triton launcher,
    so both paths accept and refuse the same inputs with the same errors (what only the
    kernel cannot take, such as a dtype, is the kernel's own check). ``read_bounds=False``
    (the kernel under CUDA-graph capture, where the host may not read device memory)
    leaves the values of ``cu_seqlens`` unread and returns None for them. ``bounds``, the
    values of ``cu_seqlens`` as host integers where the caller built it from them (the
    model's packed batches), are checked instead of reading the device: no host sync.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    varlen = cu_seqlens is not None
    if qkv.dim() != (2 if varlen else 3):
        layout = "(total, 3*H*Dh) with cu_seqlens" if varlen else "(B, N, 3*H*Dh)"
        raise ValueError(f"qkv must be {layout}, got shape {tuple(qkv.shape)}")
    width = qkv.shape[-1]
    if width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3*num_heads = {3 * num_heads}")
    if max_seqlen is not None and max_seqlen < 0:
        raise ValueError(f"max_seqlen must be non-negative, got {max_seqlen}")
    groups = qkv.shape[0]
    bounds = None
    if varlen:
        if (
            cu_seqlens.dim() != 1
            or cu_seqlens.numel() < 2
            or cu_seqlens.is_floating_point()
            or cu_seqlens.is_complex()
            or cu_seqlens.dtype == torch.bool
        ):
            raise ValueError(
                "cu_seqlens must be a 1-D integer tensor of S+1 >= 2 sequence bounds, got "
                f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}"
            )
        groups = cu_seqlens.numel() - 1
        if bounds is not None:
            if len(bounds) != cu_seqlens.numel():
                raise ValueError(
                    f"bounds has {len(bounds)} values, cu_seqlens {cu_seqlens.numel()}: they "
                    "must be the same sequence bounds"
                )
            bounds = list(bounds)
            _check_bounds(bounds, qkv.shape[0], max_seqlen)
        elif read_bounds:
            bounds = cu_seqlens.tolist()
            _check_bounds(bounds, qkv.shape[0], max_seqlen)
    _check_head_scale(head_scale, groups, num_heads, qkv.device)
    return width // (3 * num_heads), bounds


def check_split_attention_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    head_scale: torch.Tensor | None = None,
) -> None:
    """The validation of ``attention_split`` shared by this reference and the Triton launcher."""
    if query.dim() != 4 or key.shape != query.shape or value.shape != query.shape:
        raise ValueError(
            "query, key and value must be (B, H, N, Dh) of one shape, got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(
            f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, "
            f"{value.dtype}"
        )
    if key.device != query.device or value.device != query.device:
        raise ValueError("query, key and value must be on one device")
    _check_head_scale(head_scale, query.shape[0], query.shape[1], query.device)


def attention(
    qkv: torch.Tensor,
    num_heads: int,
    *,
    scale: float | None = None,
    head_scale: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    bounds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Non-causal multi-head attention on the packed QKV projection.

    qkv is (B, N, 3*H*Dh), laid out ``[q | k | v]`` with heads contiguous inside each;
    the result is (B, N, H*Dh). With ``cu_seqlens`` (integer, (S+1,), from 0 to the token
    count, non-decreasing) qkv is (total, 3*H*Dh) and each sequence attends only within
    itself; ``max_seqlen``, when given, must be at least the longest sequence (the kernel
    sizes its grid by it). ``head_scale`` multiplies each head's output: shape (H,) or
    (B, H) ((S, H) with cu_seqlens). ``bounds``: ``cu_seqlens``' values on the host, when the
    caller has them (see ``check_attention_inputs``).
    """
    head_dim, bounds = check_attention_inputs(
        qkv, num_heads, head_scale, cu_seqlens, max_seqlen, bounds=bounds
    )
    if bounds is not None:
        outs = []
        for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            seq_scale = None
            if head_scale is not None:
                seq_scale = head_scale if head_scale.dim() == 1 else head_scale[i]
            outs.append(
                attention(
                    qkv[start:end].unsqueeze(0), num_heads, scale=scale, head_scale=seq_scale
                )[0]
            )
        return torch.cat(outs, dim=0)
    batch, tokens, _ = qkv.shape
    q, k, v = qkv.view(batch, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = _sdpa(q, k, v, scale, head_scale)
    return out.transpose(1, 2).reshape(batch, tokens, num_heads * head_dim)


def attention_split(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None = None,
    head_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Non-causal multi-head attention on separate (B, H, N, Dh) q, k, v (transformers'
    attention-function layout); the result is (B, N, H, Dh). ``head_scale`` as for
    ``attention`` ((H,) or (B, H))."""
    check_split_attention_inputs(query, key, value, head_scale)
    return _sdpa(query, key, value, scale, head_scale).transpose(1, 2).contiguous()


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None,
    head_scale: torch.Tensor | None,
) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    if head_scale is not None:
        out = out * head_scale.reshape(-1, q.shape[1], 1, 1).to(out.dtype)
    return out
