"""Flash-attention forward on the packed QKV projection (non-causal, optional varlen).

q, k and v are read by strides straight out of the QKV GEMM output, viewed as
(B, N, 3, H, Dh), and the result is written as (B, N, H*Dh) for the output projection:
no transposes, no copies. Scores never leave registers; softmax statistics are fp32 and
the log-sum-exp is stored for a later backward.

Why no TMA descriptors on sm_90 (a judgement, not a measurement: no GPU was lent while this
was written). A descriptor needs 16-byte-aligned strides, which arbitrary strided qkv does
not guarantee, so the cp.async path must exist anyway; it needs a host-built descriptor per
launch or a device-side allocator; and over a varlen batch it cannot clip at sequence ends
inside the packed tensor, so the last key block still needs masked loads. What it would
save is address arithmetic on 8-16 KiB K/V tiles that cp.async pipelining already streams
into wgmma; Triton gains most from TMA together with warp specialization. Revisit if the
H100 benchmark shows the key loop bound by loads.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._common import (
    KernelSpec,
    check_no_shared_storage,
    device_arch,
    divisibility_attrs,
    interpreting,
    nearest_arch,
    record_launch,
)

__all__ = ["SUPPORTED_HEAD_DIMS", "compile_specs", "flash_attention"]

SUPPORTED_HEAD_DIMS = (32, 48, 64, 80, 96, 128)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = math.log2(math.e)

# Interpreter blocks: large enough to keep the program count low, small enough that the
# test shapes exercise several full key blocks followed by a masked tail.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)


@triton.jit
def _attend_key_block(
    acc,
    row_sum,
    row_max,
    q,
    k_ptrs,
    v_ptrs,
    start_n,
    seq_len,
    stride_token,
    qk_scale_log2,
    d_mask,
    BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    PAD_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold one block of keys/values into the running (acc, row_sum, row_max) of the queries."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    block_offset = start_n * stride_token
    if MASK_KEYS:
        kv_mask = (offs_n < seq_len)[:, None] & d_mask[None, :]
        k = tl.load(k_ptrs + block_offset, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs + block_offset, mask=kv_mask, other=0.0)
    elif PAD_D:
        k = tl.load(k_ptrs + block_offset, mask=d_mask[None, :], other=0.0)
        v = tl.load(v_ptrs + block_offset, mask=d_mask[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs + block_offset)
        v = tl.load(v_ptrs + block_offset)
    if UPCAST_DOT:
        k = k.to(tl.float32)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASK_KEYS:
        scores = tl.where((offs_n < seq_len)[None, :], scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale_log2)
    p = tl.math.exp2(scores * qk_scale_log2 - new_max[:, None])
    rescale = tl.math.exp2(row_max - new_max)
    row_sum = row_sum * rescale + tl.sum(p, 1)
    acc = acc * rescale[:, None]
    # p is rounded to the input dtype before the second product, as every flash kernel does.
    p = p.to(v.dtype)
    if UPCAST_DOT:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
    return acc, row_sum, new_max


@triton.jit
def _attention_fwd_kernel(
    qkv_ptr,
    out_ptr,
    lse_ptr,
    head_scale_ptr,
    cu_seqlens_ptr,
    qk_scale_log2,
    max_seqlen,
    num_heads,
    stride_qkv_batch,
    stride_qkv_token,
    stride_out_batch,
    stride_out_token,
    stride_lse_head,
    stride_head_scale_batch,
    stride_head_scale_head,
    work_bucket,
    HEAD_DIM: tl.constexpr,
    BLOCK_DMODEL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_HEAD_SCALE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch or sequence, head) against all its keys.

    Grid: (batch*heads or sequences*heads, query blocks). Axis 0 allows 2^31 - 1 programs;
    axes 1 and 2 stop at 65535.
    """
    # Programs start in launch order, axis 0 fastest. Re-deal the ids so that the query
    # blocks of one head run side by side and share its K/V tiles in L2 instead of each
    # re-reading them from HBM, while the grid keeps batch*heads on the large axis.
    num_m_blocks = tl.num_programs(1)
    launch_order = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
    pid_bh = (launch_order // num_m_blocks).to(tl.int32)
    pid_m = (launch_order % num_m_blocks).to(tl.int32)
    seq_idx = pid_bh // num_heads
    head = pid_bh % num_heads
    if VARLEN:
        seq_start = tl.load(cu_seqlens_ptr + seq_idx)
        seq_len = tl.load(cu_seqlens_ptr + seq_idx + 1) - seq_start
        # qkv/out are (total, width): a sequence starts at a token, not a batch stride.
        qkv_base = qkv_ptr + seq_start.to(tl.int64) * stride_qkv_token
        out_base = out_ptr + seq_start.to(tl.int64) * stride_out_token
        lse_base = lse_ptr + head.to(tl.int64) * stride_lse_head + seq_start
    else:
        # Batched: every sequence is max_seqlen long.
        seq_len = max_seqlen
        qkv_base = qkv_ptr + seq_idx.to(tl.int64) * stride_qkv_batch
        out_base = out_ptr + seq_idx.to(tl.int64) * stride_out_batch
        lse_base = lse_ptr + pid_bh.to(tl.int64) * stride_lse_head
    block_start = pid_m * BLOCK_M
    # Varlen grids are sized for the longest sequence; shorter ones have nothing here.
    if block_start >= seq_len:
        return

    stride_token = stride_qkv_token.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_DMODEL)
    d_mask = offs_d < HEAD_DIM
    row_mask = (block_start + offs_m) < seq_len
    q_col = head * HEAD_DIM
    k_col = (num_heads + head) * HEAD_DIM
    v_col = (2 * num_heads + head) * HEAD_DIM

    # Offsets inside one block stay int32 (BLOCK * stride < 2^31 for any real layout); the
    # block and sequence starts, which can pass 2^31 elements, are int64.
    q_ptrs = (
        qkv_base
        + block_start * stride_token
        + offs_m[:, None] * stride_qkv_token
        + (q_col + offs_d)[None, :]
    )
    q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    k_ptrs = qkv_base + offs_n[:, None] * stride_qkv_token + (k_col + offs_d)[None, :]
    v_ptrs = qkv_base + offs_n[:, None] * stride_qkv_token + (v_col + offs_d)[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_DMODEL], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    PAD_D: tl.constexpr = BLOCK_DMODEL != HEAD_DIM

    # Full key blocks take unmasked loads; only the ragged last block pays for the masks.
    full_end = (seq_len // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        acc, row_sum, row_max = _attend_key_block(
            acc, row_sum, row_max, q, k_ptrs, v_ptrs, start_n, seq_len, stride_token,
            qk_scale_log2, d_mask, BLOCK_N, False, PAD_D, UPCAST_DOT, DOT_PRECISION,
        )  # fmt: skip
    if full_end < seq_len:
        acc, row_sum, row_max = _attend_key_block(
            acc, row_sum, row_max, q, k_ptrs, v_ptrs, full_end, seq_len, stride_token,
            qk_scale_log2, d_mask, BLOCK_N, True, PAD_D, UPCAST_DOT, DOT_PRECISION,
        )  # fmt: skip

    out_scale = 1.0 / row_sum
    if HAS_HEAD_SCALE:
        head_scale = tl.load(
            head_scale_ptr + seq_idx * stride_head_scale_batch + head * stride_head_scale_head
        ).to(tl.float32)
        out_scale = out_scale * head_scale
    out = acc * out_scale[:, None]
    out_ptrs = (
        out_base
        + block_start * stride_out_token.to(tl.int64)
        + offs_m[:, None] * stride_out_token
        + (q_col + offs_d)[None, :]
    )
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    # row_max and row_sum live in the log2 domain of the scaled scores; lse is natural-log.
    lse = (row_max + tl.math.log2(row_sum)) * 0.6931471805599453
    tl.store(lse_base + block_start + offs_m, lse, mask=row_mask)


def _config(block_m: int, block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages
    )


# Autotune lists per (architecture, padded head dim up to 64 / 128), each led by its default.
# Every entry compiles for fp16 and bf16 without spills or local memory and within shared
# memory (kernels/report.py checks them all). Shapes that spill were dropped: on sm_80 a
# BLOCK_M of 64 against 128-wide heads makes Triton split the MMA warps along columns, and
# BLOCK_N 128 with 4 warps overflows the register file everywhere.
_CONFIGS: dict[tuple[int, int], list[triton.Config]] = {
    (80, 64): [
        _config(128, 64, 4, 3),
        _config(64, 64, 4, 3),
        _config(128, 32, 4, 3),
        _config(128, 64, 8, 3),
        _config(128, 128, 8, 2),
    ],
    (80, 128): [
        _config(128, 32, 8, 3),
        _config(128, 64, 8, 3),
        _config(128, 32, 8, 2),
    ],
    (90, 64): [
        _config(128, 64, 4, 3),
        _config(128, 128, 8, 3),
        _config(128, 64, 8, 3),
        _config(64, 64, 4, 3),
        _config(128, 64, 4, 4),
        _config(128, 128, 8, 2),
    ],
    (90, 128): [
        _config(128, 64, 8, 3),
        _config(128, 64, 8, 2),
        _config(64, 64, 4, 3),
    ],
}


_BLOCKS = [
    (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"])
    for configs in (*_CONFIGS.values(), [_INTERPRETER_CONFIG])
    for config in configs
]
# Query blocks go on grid axis 1, which CUDA caps at 65535.
_MAX_TOKENS = 65535 * min(m for m, _ in _BLOCKS)
_MAX_BLOCK = max(max(block) for block in _BLOCKS)


def _config_width(block_dmodel: int) -> int:
    return 64 if block_dmodel <= 64 else 128


@functools.cache
def _tuned_kernel(arch: int, width: int) -> triton.runtime.Autotuner:
    # Every config rewrites out and lse in full, so benchmarking needs no reset hooks.
    # Keyed on the exact (longest) sequence length like other flash kernels: varlen batches
    # tune once per distinct max_seqlen.
    # cache_results keeps the choice on disk, so a new process does not re-tune.
    # work_bucket (the grid's size, bucketed) keeps a batch-1 winner from serving a full batch.
    return triton.autotune(
        configs=_CONFIGS[(arch, width)],
        key=["HEAD_DIM", "max_seqlen", "work_bucket"],
        cache_results=True,
    )(_attention_fwd_kernel)


def _check_cu_seqlens_values(bounds: list[int], total: int, max_seqlen: int | None) -> None:
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at total={total}, got {bounds[0]}..{bounds[-1]}"
        )
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if min(lengths) < 0:
        raise ValueError("cu_seqlens must be non-decreasing")
    if max_seqlen is not None and max(lengths) > max_seqlen:
        # The grid is sized by max_seqlen: a longer sequence would be left partly unwritten.
        raise ValueError(f"a sequence has {max(lengths)} tokens, more than max_seqlen={max_seqlen}")


def _validate(
    qkv: torch.Tensor,
    num_heads: int,
    head_scale: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
) -> int:
    """Check the inputs and return head_dim."""
    expected_ndim = 3 if cu_seqlens is None else 2
    if qkv.dim() != expected_ndim:
        layout = "(B, N, 3*H*Dh)" if cu_seqlens is None else "(total, 3*H*Dh) with cu_seqlens"
        raise ValueError(f"qkv must be {layout}, got shape {tuple(qkv.shape)}")
    if qkv.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"qkv dtype {qkv.dtype} unsupported; use float16, bfloat16 or float32")
    if num_heads < 1:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    width = qkv.shape[-1]
    if width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3*num_heads = {3 * num_heads}")
    head_dim = width // (3 * num_heads)
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} unsupported; supported: {SUPPORTED_HEAD_DIMS}")
    if qkv.stride(-1) != 1:
        raise ValueError("qkv must be contiguous in its last dimension")
    if cu_seqlens is not None:
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens must be 1-D int32 of length S+1 >= 2, got {cu_seqlens.dtype} "
                f"shape {tuple(cu_seqlens.shape)}"
            )
        if cu_seqlens.device != qkv.device:
            raise ValueError("cu_seqlens must be on the same device as qkv")
        # Reading the values syncs the device, which CUDA-graph capture forbids.
        if not (qkv.is_cuda and torch.cuda.is_current_stream_capturing()):
            _check_cu_seqlens_values(cu_seqlens.tolist(), qkv.shape[0], max_seqlen)
    if head_scale is not None:
        groups = qkv.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        allowed = [(num_heads,), (groups, num_heads)]
        if tuple(head_scale.shape) not in allowed:
            raise ValueError(
                f"head_scale must have shape {allowed[0]} or {allowed[1]}, "
                f"got {tuple(head_scale.shape)}"
            )
        if not head_scale.is_floating_point() or head_scale.device != qkv.device:
            raise ValueError("head_scale must be a floating-point tensor on qkv's device")
    return head_dim


def flash_attention(
    qkv: torch.Tensor,
    num_heads: int,
    scale: float | None = None,
    head_scale: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    *,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention on the packed QKV projection; returns (out, lse).

        qkv is (B, N, 3*H*Dh) viewed as (B, N, 3, H, Dh), any strides in B and N; out is
        (B, N, H*Dh) and lse (fp32, natural log) is (B, H, N). With cu_seqlens (int32 (S+1,),
        from 0) qkv is (total, 3*H*Dh), each sequence attends within itself, out is
        (total, H*Dh) and lse is (H, total); max_seqlen is required under CUDA-graph capture
    (otherwise it is computed on the host). float32 is exact and meant for the interpreter: on
    CUDA its tiles spill (ops.attention sends it to SDPA).
        head_scale, (H,) or (B, H) ((S, H) with cu_seqlens), multiplies each head's output.
        scale defaults to 1/sqrt(Dh). ``out`` (last dim contiguous) and ``lse`` (contiguous),
        when given, receive the results.
    """
    head_dim = _validate(qkv, num_heads, head_scale, cu_seqlens, max_seqlen)
    varlen = cu_seqlens is not None
    tokens = qkv.shape[-2]
    groups = cu_seqlens.numel() - 1 if varlen else qkv.shape[0]
    out_shape = (*qkv.shape[:-1], num_heads * head_dim)
    lse_shape = (num_heads, tokens) if varlen else (groups, num_heads, tokens)
    if qkv.stride(-2) * _MAX_BLOCK >= 2**31:
        # Offsets inside one block are int32; only an exotic layout gets this far.
        qkv = qkv.contiguous()
    if out is None:
        out = torch.empty(out_shape, dtype=qkv.dtype, device=qkv.device)
    elif tuple(out.shape) != out_shape or out.dtype != qkv.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {out_shape} {qkv.dtype} with a contiguous last dim")
    elif out.stride(-2) * _MAX_BLOCK >= 2**31:
        raise ValueError(f"out's token stride {out.stride(-2)} is too large; use a denser out")
    else:
        check_no_shared_storage(out, (qkv,))
    if lse is None:
        lse = torch.empty(lse_shape, dtype=torch.float32, device=qkv.device)
    elif tuple(lse.shape) != lse_shape or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be a contiguous float32 tensor of shape {lse_shape}")
    if not varlen:
        max_seqlen = tokens
    elif max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if max_seqlen > _MAX_TOKENS:
        raise ValueError(f"sequence length {max_seqlen} exceeds {_MAX_TOKENS} tokens")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif not 0 < scale < math.inf:
        # The kernel takes the row maximum before scaling, which needs a positive scale.
        raise ValueError(f"scale must be positive and finite, got {scale}")
    if head_scale is None:
        head_scale_strides = (0, 0)
    elif head_scale.dim() == 1:
        head_scale_strides = (0, head_scale.stride(0))
    else:
        head_scale_strides = head_scale.stride()
    if groups * num_heads == 0 or max_seqlen == 0:
        return out, lse

    args = (
        qkv,
        out,
        lse,
        head_scale,
        cu_seqlens,
        scale * _LOG2E,
        max_seqlen,
        num_heads,
        qkv.stride(0) if not varlen else 0,
        qkv.stride(-2),
        out.stride(0) if not varlen else 0,
        out.stride(-2),
        tokens,
        *head_scale_strides,
        min(triton.next_power_of_2(groups * num_heads * triton.cdiv(max_seqlen, 128)), 1 << 14),
    )
    flags = {
        "HEAD_DIM": head_dim,
        "BLOCK_DMODEL": triton.next_power_of_2(head_dim),
        "VARLEN": varlen,
        "HAS_HEAD_SCALE": head_scale is not None,
        # The interpreter multiplies raw bf16 bit patterns in tl.dot (triton #11584).
        "UPCAST_DOT": interpreting() and qkv.dtype == torch.bfloat16,
        # fp32 inputs get exact products, as PyTorch's fp32 attention does; 16-bit operands
        # ignore the setting.
        "DOT_PRECISION": "ieee" if qkv.dtype == torch.float32 else "tf32",
    }

    def grid(meta: dict) -> tuple[int, int]:
        return (groups * num_heads, triton.cdiv(max_seqlen, meta["BLOCK_M"]))

    record_launch("attention")
    if interpreting():
        config = _INTERPRETER_CONFIG
        _attention_fwd_kernel[grid({**config.kwargs})](
            *args, **flags, **config.kwargs, num_warps=config.num_warps,
            num_stages=config.num_stages,
        )  # fmt: skip
    else:
        arch = nearest_arch((80, 90), device_arch(qkv.device))
        kernel = _tuned_kernel(arch, _config_width(flags["BLOCK_DMODEL"]))
        kernel[grid](*args, **flags)
    return out, lse


def _signature(dtype: str) -> dict[str, str]:
    return {
        "qkv_ptr": f"*{dtype}",
        "out_ptr": f"*{dtype}",
        "lse_ptr": "*fp32",
        "head_scale_ptr": "*fp32",
        "cu_seqlens_ptr": "*i32",
        "qk_scale_log2": "fp32",
        "max_seqlen": "i32",
        "num_heads": "i32",
        "stride_qkv_batch": "i64",
        "stride_qkv_token": "i32",
        "stride_out_batch": "i64",
        "stride_out_token": "i32",
        "stride_lse_head": "i32",
        "stride_head_scale_batch": "i32",
        "stride_head_scale_head": "i32",
        "work_bucket": "i32",
    }


# What the JIT would specialize for the model's packed layout (16-byte aligned tensors,
# row strides 3*H*Dh and H*Dh that are multiples of 16). Without it the compiler cannot
# prove 16-byte vectors, drops cp.async pipelining and spills: the AOT report must compile
# what the runtime runs. Keys are ASTSource attrs (argument index tuples).
_ALIGNED_ARGS = (
    "qkv_ptr",
    "out_ptr",
    "lse_ptr",
    "head_scale_ptr",
    "cu_seqlens_ptr",
    "stride_qkv_batch",
    "stride_qkv_token",
    "stride_out_batch",
    "stride_out_token",
)


def compile_specs(arch: int) -> list[KernelSpec]:
    """Every compile the AOT report must check on sm_<arch>.

    Every autotune config for every supported head_dim it serves (the autotuner may pick any
    of them at run time), fp16 and bf16 each, batched
    mode with head_scale (the widest feature set the model uses). ``extra["attrs"]`` holds
    the alignment attributes to pass as ``ASTSource(..., attrs=...)``.
    """
    specs = []
    for dtype in ("fp16", "bf16"):
        for head_dim in SUPPORTED_HEAD_DIMS:
            block_dmodel = triton.next_power_of_2(head_dim)
            for config in _CONFIGS[(arch, _config_width(block_dmodel))]:
                block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
                specs.append(
                    KernelSpec(
                        name="attention",
                        fn=_attention_fwd_kernel,
                        signature=_signature(dtype),
                        constexprs={
                            "HEAD_DIM": head_dim,
                            "BLOCK_DMODEL": block_dmodel,
                            "BLOCK_M": block_m,
                            "BLOCK_N": block_n,
                            "VARLEN": False,
                            "HAS_HEAD_SCALE": True,
                            "UPCAST_DOT": False,
                            "DOT_PRECISION": "tf32",
                        },
                        num_warps=config.num_warps,
                        num_stages=config.num_stages,
                        label=(
                            f"{dtype} d{head_dim} m{block_m} n{block_n} "
                            f"w{config.num_warps} s{config.num_stages}"
                        ),
                        extra={"attrs": divisibility_attrs(_attention_fwd_kernel, _ALIGNED_ARGS)},
                    )
                )
    return specs
