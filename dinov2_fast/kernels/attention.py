"""Flash-attention forward (non-causal, optional varlen) on strided q, k and v.

q, k and v are read through their own pointers and (batch, token, head) strides: the packed
QKV GEMM output (B, N, 3*H*Dh) passes three views of itself, transformers' (B, H, N, Dh)
projections pass themselves; either way no transposes and no copies. The result is written
as (B, N, H*Dh) for the output projection. Scores never leave registers; softmax statistics
are fp32 and the log-sum-exp is stored for a later backward.

Keys are folded BLOCK_N at a time with unmasked loads; the ragged rest of the sequence
(N mod BLOCK_N keys) is folded TAIL_N at a time with masked loads, so the 257 tokens of a
224 px image pay for 16 masked keys rather than a whole 64-wide block for one valid key.

Launch configurations are explicit ``AttentionConfig`` values: ``candidate_configs`` lists
those that compile clean for an architecture and head_dim (a planner times them on the
user's GPU); without one, Triton's autotuner picks among the same candidates.

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
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from ..reference import check_attention_inputs, check_split_attention_inputs
from ._common import (
    KernelSpec,
    cdiv,
    check_no_shared_storage,
    device_arch,
    is_interpreted,
    jit_specialization,
    nearest_arch,
    next_power_of_2,
    record_launch,
)

__all__ = [
    "SUPPORTED_HEAD_DIMS",
    "AttentionConfig",
    "candidate_configs",
    "compile_specs",
    "flash_attention",
    "flash_attention_split",
]

SUPPORTED_HEAD_DIMS = (32, 48, 64, 80, 96, 128)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = math.log2(math.e)
_CONFIG_NAME = re.compile(r"m([1-9]\d*)n([1-9]\d*)t([1-9]\d*)w([1-9]\d*)s([1-9]\d*)")


@dataclass(frozen=True)
class AttentionConfig:
    """One launch configuration of the attention kernel.

    Each program takes ``block_m`` queries of one (sequence, head) and folds its keys in
    ``block_n``-wide unmasked steps, then the ragged rest ``tail_n`` at a time, masked.
    ``name`` (e.g. ``"m64n64t16w4s3"``) is stable, short and parsed back by ``from_name``.
    """

    block_m: int
    block_n: int
    tail_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        for field_name in ("block_m", "block_n", "tail_n"):
            value = getattr(self, field_name)
            # tl.dot needs every dimension >= 16; tl.arange needs powers of two.
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"{field_name} must be a power of two >= 16, got {value!r}")
        if self.tail_n > self.block_n:
            raise ValueError(f"tail_n {self.tail_n} may not exceed block_n {self.block_n}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"num_stages must be a positive int, got {self.num_stages!r}")

    @property
    def name(self) -> str:
        return f"m{self.block_m}n{self.block_n}t{self.tail_n}w{self.num_warps}s{self.num_stages}"

    @classmethod
    def from_name(cls, name: str) -> AttentionConfig:
        """The config whose ``name`` is ``name``; ValueError for anything else."""
        match = _CONFIG_NAME.fullmatch(name) if isinstance(name, str) else None
        if match is None:
            raise ValueError(
                f"{name!r} is not an attention config name: expected "
                "m<block_m>n<block_n>t<tail_n>w<num_warps>s<num_stages>, e.g. 'm64n64t16w4s3'"
            )
        return cls(*map(int, match.groups()))

    def _meta(self) -> dict[str, int]:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "TAIL_N": self.tail_n}

    @functools.cached_property
    def _launch_options(self) -> dict[str, int]:
        """The keywords of a direct launch: block sizes, warps and stages."""
        return {**self._meta(), "num_warps": self.num_warps, "num_stages": self.num_stages}


# Interpreter default: blocks large enough to keep the program count low, small enough that
# the test shapes exercise several full key blocks followed by a masked tail.
_INTERPRETER_CONFIG = AttentionConfig(64, 64, 16, 4, 1)


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
    stride_k_token,
    stride_v_token,
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
    k_block = k_ptrs + tl.cast(start_n, tl.int64) * stride_k_token
    v_block = v_ptrs + tl.cast(start_n, tl.int64) * stride_v_token
    if MASK_KEYS:
        kv_mask = (offs_n < seq_len)[:, None] & d_mask[None, :]
        k = tl.load(k_block, mask=kv_mask, other=0.0)
        v = tl.load(v_block, mask=kv_mask, other=0.0)
    elif PAD_D:
        k = tl.load(k_block, mask=d_mask[None, :], other=0.0)
        v = tl.load(v_block, mask=d_mask[None, :], other=0.0)
    else:
        k = tl.load(k_block)
        v = tl.load(v_block)
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


# Integer arguments the JIT must not specialise: they never decide vectorisation, and
# specialising them (divisible by 16 or not, 1 or not) would compile one more kernel per
# token count, head count or grid size.
_UNSPECIALIZED_ARGS = ("max_seqlen", "num_tokens", "num_heads", "work_bucket")


@triton.jit(do_not_specialize=_UNSPECIALIZED_ARGS)
def _attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    head_scale_ptr,
    cu_seqlens_ptr,
    qk_scale_log2,
    max_seqlen,
    num_tokens,
    num_heads,
    q_offset,
    k_offset,
    v_offset,
    stride_q_batch,
    stride_q_token,
    stride_q_head,
    stride_k_batch,
    stride_k_token,
    stride_k_head,
    stride_v_batch,
    stride_v_token,
    stride_v_head,
    stride_out_batch,
    stride_out_token,
    stride_head_scale_batch,
    stride_head_scale_head,
    work_bucket,
    HEAD_DIM: tl.constexpr,
    BLOCK_DMODEL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TAIL_N: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_HEAD_SCALE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch or sequence, head) against all its keys.

    Grid: (batch*heads or sequences*heads, query blocks). Axis 0 allows 2^31 - 1 programs;
    axes 1 and 2 stop at 65535. num_tokens is the token count of one batch row (the total
    with VARLEN); lse is contiguous, so it is also lse's head stride.
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
        # Clamped into [0, num_tokens] and max_seqlen: bounds the host did not read (under
        # CUDA-graph capture) cannot make a program touch memory outside the tensors.
        seq_start = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + seq_idx), 0), num_tokens)
        seq_end = tl.minimum(tl.load(cu_seqlens_ptr + seq_idx + 1), num_tokens)
        seq_len = tl.minimum(seq_end - seq_start, max_seqlen)
        # q/k/v/out are (total, ...): a sequence starts at a token, not a batch stride.
        first_token = seq_start.to(tl.int64)
        q_base = q_ptr + first_token * stride_q_token
        k_base = k_ptr + first_token * stride_k_token
        v_base = v_ptr + first_token * stride_v_token
        out_base = out_ptr + first_token * stride_out_token
        lse_base = lse_ptr + head.to(tl.int64) * num_tokens + first_token
    else:
        # Batched: every sequence is max_seqlen long.
        seq_len = max_seqlen
        batch = seq_idx.to(tl.int64)
        q_base = q_ptr + batch * stride_q_batch
        k_base = k_ptr + batch * stride_k_batch
        v_base = v_ptr + batch * stride_v_batch
        out_base = out_ptr + batch * stride_out_batch
        lse_base = lse_ptr + pid_bh.to(tl.int64) * num_tokens
    block_start = pid_m * BLOCK_M
    # Varlen grids are sized for the longest sequence; shorter ones have nothing here.
    if block_start >= seq_len:
        return

    head_offset = head.to(tl.int64)
    q_base += q_offset + head_offset * stride_q_head
    k_base += k_offset + head_offset * stride_k_head
    v_base += v_offset + head_offset * stride_v_head
    out_base += head_offset * HEAD_DIM
    block_first = block_start.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DMODEL)
    d_mask = offs_d < HEAD_DIM
    row_mask = (block_start + offs_m) < seq_len
    PAD_D: tl.constexpr = BLOCK_DMODEL != HEAD_DIM

    # Offsets inside one block stay int32 (BLOCK * stride < 2^31 for any real layout); the
    # block and sequence starts, which can pass 2^31 elements, are int64.
    q_ptrs = (
        q_base + block_first * stride_q_token + offs_m[:, None] * stride_q_token + offs_d[None, :]
    )
    q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    acc = tl.zeros([BLOCK_M, BLOCK_DMODEL], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    # Full key blocks take unmasked loads; only the ragged rest pays for the masks, in
    # TAIL_N-wide steps.
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs = k_base + offs_n[:, None] * stride_k_token + offs_d[None, :]
    v_ptrs = v_base + offs_n[:, None] * stride_v_token + offs_d[None, :]
    full_end = (seq_len // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        acc, row_sum, row_max = _attend_key_block(
            acc, row_sum, row_max, q, k_ptrs, v_ptrs, start_n, seq_len, stride_k_token,
            stride_v_token, qk_scale_log2, d_mask, BLOCK_N, False, PAD_D, UPCAST_DOT,
            DOT_PRECISION,
        )  # fmt: skip
    offs_tail = tl.arange(0, TAIL_N)
    k_tail_ptrs = k_base + offs_tail[:, None] * stride_k_token + offs_d[None, :]
    v_tail_ptrs = v_base + offs_tail[:, None] * stride_v_token + offs_d[None, :]
    for start_n in range(full_end, seq_len, TAIL_N):
        acc, row_sum, row_max = _attend_key_block(
            acc, row_sum, row_max, q, k_tail_ptrs, v_tail_ptrs, start_n, seq_len,
            stride_k_token, stride_v_token, qk_scale_log2, d_mask, TAIL_N, True, PAD_D,
            UPCAST_DOT, DOT_PRECISION,
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
        + block_first * stride_out_token
        + offs_m[:, None] * stride_out_token
        + offs_d[None, :]
    )
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    # row_max and row_sum live in the log2 domain of the scaled scores; lse is natural-log.
    lse = (row_max + tl.math.log2(row_sum)) * 0.6931471805599453
    tl.store(lse_base + block_start + offs_m, lse, mask=row_mask)


# Fixed when the kernel is defined (@triton.jit reads TRITON_INTERPRET then), so launches
# need not read the environment.
_INTERPRETED = is_interpreted(_attention_fwd_kernel)


def _config_width(head_dim: int) -> int:
    """The padded head width a candidate list serves: 64 (head_dim <= 64) or 128."""
    return 64 if head_dim <= 64 else 128


_ARCHES = (80, 90)
# Candidates per (architecture, padded head width), each led by its default. Every entry
# compiles for fp16 and bf16 and every signature the model launches without spills or
# local memory, within shared memory, and with wgmma on sm_90 (kernels/report.py checks
# them all). Short sequences (N ~ 257-261 at 224 px) want BLOCK_M 64 (a third 128-row query
# block would hold one valid row) and a 16-wide tail; long ones (1370+) the 128-row blocks
# and 128-wide key steps. The tail_n == block_n entries fold the tail as one masked block,
# as the kernel did before tails were narrow. Dropped because they spill: BLOCK_N 128 with
# 4 warps everywhere; on sm_80 BLOCK_M 64 against 128-wide heads (Triton splits the MMA
# warps along columns), and m128n64t64w4s3 (the old default: its pipelined 64-wide tail
# loop spills 8-24 B at 255 registers, where the 16-wide tail fits in 255 without).
_C = AttentionConfig
_CANDIDATES: dict[tuple[int, int], tuple[AttentionConfig, ...]] = {
    (80, 64): (
        _C(128, 64, 16, 4, 3),
        _C(64, 64, 16, 4, 3),
        _C(64, 32, 16, 4, 3),
        _C(128, 32, 16, 4, 3),
        _C(128, 64, 16, 8, 3),
        _C(128, 128, 16, 8, 2),
    ),
    (80, 128): (
        _C(128, 32, 16, 8, 3),
        _C(128, 64, 16, 8, 3),
        _C(128, 32, 16, 8, 2),
        _C(128, 32, 32, 8, 3),
    ),
    (90, 64): (
        _C(128, 64, 16, 4, 3),
        _C(64, 64, 16, 4, 3),
        _C(128, 128, 16, 8, 3),
        _C(128, 64, 16, 8, 3),
        _C(128, 64, 16, 4, 4),
        _C(128, 128, 16, 8, 2),
        _C(128, 64, 64, 4, 3),
    ),
    (90, 128): (
        _C(128, 64, 16, 8, 3),
        _C(64, 64, 16, 4, 3),
        _C(128, 64, 16, 8, 2),
        _C(128, 64, 64, 8, 3),
    ),
}
del _C

_ALL_CONFIGS = {config for configs in _CANDIDATES.values() for config in configs}
# Query blocks go on grid axis 1, which CUDA caps at 65535.
_MAX_TOKENS = 65535 * min(c.block_m for c in (*_ALL_CONFIGS, _INTERPRETER_CONFIG))
# Offsets inside one block are int32: a token stride times this must stay below 2^31.
_MAX_BLOCK = max(max(c.block_m, c.block_n) for c in (*_ALL_CONFIGS, _INTERPRETER_CONFIG))


def candidate_configs(arch: int, head_dim: int) -> tuple[AttentionConfig, ...]:
    """Every config a planner may time for ``head_dim`` on sm_<arch> (80 -> 80, 86 -> 80,
    90 and newer -> 90), the default first. All compile clean for that architecture."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} unsupported; supported: {SUPPORTED_HEAD_DIMS}")
    return _CANDIDATES[(nearest_arch(_ARCHES, arch), _config_width(head_dim))]


@functools.cache
def _tuned_kernel(arch: int, width: int) -> triton.runtime.Autotuner:
    # Every config rewrites out and lse in full, so benchmarking needs no reset hooks.
    # Keyed on the exact (longest) sequence length like other flash kernels: varlen batches
    # tune once per distinct max_seqlen.
    # cache_results keeps the choice on disk, so a new process does not re-tune.
    # work_bucket (the grid's size, bucketed) keeps a batch-1 winner from serving a full batch.
    configs = [
        triton.Config(c._meta(), num_warps=c.num_warps, num_stages=c.num_stages)
        for c in _CANDIDATES[(arch, width)]
    ]
    return triton.autotune(
        configs=configs, key=["HEAD_DIM", "max_seqlen", "work_bucket"], cache_results=True
    )(_attention_fwd_kernel)


@functools.cache
def _arch(device: torch.device) -> int:
    return nearest_arch(_ARCHES, device_arch(device))


class _Launch(NamedTuple):
    """One launch of the kernel, before a config is chosen: what both the launchers and the
    compile report (``compile_specs``) take, so the report compiles what runs."""

    args: tuple
    constexprs: dict[str, Any]
    programs: int  # grid axis 0: sequences x heads
    max_seqlen: int


@functools.cache
def _constexprs(
    head_dim: int, dtype: torch.dtype, varlen: bool, has_head_scale: bool
) -> dict[str, Any]:
    """The kernel's flags; one shared dict per combination (never mutated)."""
    return {
        "HEAD_DIM": head_dim,
        "BLOCK_DMODEL": next_power_of_2(head_dim),
        "VARLEN": varlen,
        "HAS_HEAD_SCALE": has_head_scale,
        # The interpreter multiplies raw bf16 bit patterns in tl.dot (triton #11584).
        "UPCAST_DOT": dtype == torch.bfloat16 and _INTERPRETED,
        # fp32 inputs get exact products, as PyTorch's fp32 attention does; 16-bit operands
        # ignore the setting.
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


def _prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: tuple[int, int, int],
    strides: tuple[int, ...],
    out: torch.Tensor,
    out_strides: tuple[int, int],
    lse: torch.Tensor,
    head_scale: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    scale: float,
    num_heads: int,
    head_dim: int,
    groups: int,
    max_seqlen: int,
    num_tokens: int,
) -> _Launch:
    """The kernel's arguments: q, k, v from their tensors' element ``offsets`` with
    (batch, token, head) ``strides`` each, out with (batch, token) strides (heads at Dh)."""
    if head_scale is None:
        head_scale_strides = (0, 0)
    elif head_scale.dim() == 1:
        head_scale_strides = (0, head_scale.stride(0))
    else:
        head_scale_strides = head_scale.stride()
    programs = groups * num_heads
    work_bucket = min(next_power_of_2(programs * cdiv(max_seqlen, 128)), 1 << 14)
    args = (
        q, k, v, out, lse, head_scale, cu_seqlens, scale * _LOG2E, max_seqlen, num_tokens,
        num_heads, *offsets, *strides, *out_strides, *head_scale_strides, work_bucket,
    )  # fmt: skip
    flags = _constexprs(head_dim, q.dtype, cu_seqlens is not None, head_scale is not None)
    return _Launch(args, flags, programs, max_seqlen)


def _launcher(
    launch: _Launch, device: torch.device, config: AttentionConfig | None
) -> Callable[..., Any]:
    """The kernel call of ``launch``, its grid and constexprs bound: call it on the args."""
    if config is None and _INTERPRETED:
        config = _INTERPRETER_CONFIG
    if config is not None:
        grid = (launch.programs, cdiv(launch.max_seqlen, config.block_m))
        return functools.partial(
            _attention_fwd_kernel[grid], **launch.constexprs, **config._launch_options
        )
    programs, max_seqlen = launch.programs, launch.max_seqlen
    kernel = _tuned_kernel(_arch(device), _config_width(launch.constexprs["HEAD_DIM"]))
    return functools.partial(
        kernel[lambda meta: (programs, cdiv(max_seqlen, meta["BLOCK_M"]))], **launch.constexprs
    )


def _run(launch: _Launch, device: torch.device, config: AttentionConfig | None) -> None:
    record_launch("attention")
    _launcher(launch, device, config)(*launch.args)


class _DenseLaunch(NamedTuple):
    """A batched packed-qkv call without head_scale, out or lse, prepared once per layout:
    the fused forward's case. Every argument but the tensors is fixed by the layout."""

    out_shape: tuple[int, ...]
    lse_shape: tuple[int, int, int]
    tail: tuple  # the arguments after (q, k, v, out, lse)
    launch: Callable[..., Any] | None  # None: nothing to compute (an empty tensor)


def _dense_launch(
    qkv: torch.Tensor,
    num_heads: int,
    scale: float | None,
    max_seqlen: int | None,
    config: AttentionConfig | None,
) -> _DenseLaunch:
    head_dim, scale, _ = _check_packed(qkv, num_heads, scale, None, None, max_seqlen)
    batch, tokens = qkv.shape[0], qkv.shape[1]
    out = torch.empty((batch, tokens, num_heads * head_dim), dtype=qkv.dtype, device="meta")
    lse = torch.empty((batch, num_heads, tokens), dtype=torch.float32, device="meta")
    launch = _packed_launch(qkv, num_heads, head_dim, scale, None, None, tokens, out, lse)
    runnable = out.numel() and tokens
    return _DenseLaunch(
        tuple(out.shape),
        tuple(lse.shape),
        launch.args[5:],
        _launcher(launch, qkv.device, config) if runnable else None,
    )


def _packed_launch(
    qkv: torch.Tensor,
    num_heads: int,
    head_dim: int,
    scale: float,
    head_scale: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> _Launch:
    """The launch for packed qkv: q, k and v at column offsets 0, H*Dh and 2*H*Dh of the
    one tensor (no views: each would cost a microsecond or two on the host)."""
    width = num_heads * head_dim
    varlen = cu_seqlens is not None
    strides = (0 if varlen else qkv.stride(0), qkv.stride(-2), head_dim) * 3
    out_strides = (0 if varlen else out.stride(0), out.stride(-2))
    groups = cu_seqlens.shape[0] - 1 if varlen else qkv.shape[0]
    return _prepare(
        qkv, qkv, qkv, (0, width, 2 * width), strides, out, out_strides, lse, head_scale,
        cu_seqlens, scale, num_heads, head_dim, groups, max_seqlen, qkv.shape[-2],
    )  # fmt: skip


# Outcomes of the checks that depend only on a call's layout (shapes, strides, dtypes,
# devices, heads, scale), keyed by it: a steady-state launch repeats one layout, so it
# looks the outcome up instead of re-checking. Bounded; cleared when full.
_CHECKED_LAYOUTS: dict[tuple, Any] = {}
_MAX_CHECKED_LAYOUTS = 4096


def _checked_once(key: tuple, check: Callable[..., Any], *args: Any) -> Any:
    known = _CHECKED_LAYOUTS.get(key)
    if known is None:
        known = check(*args)
        if len(_CHECKED_LAYOUTS) >= _MAX_CHECKED_LAYOUTS:
            _CHECKED_LAYOUTS.clear()
        _CHECKED_LAYOUTS[key] = known
    return known


def _check_packed(
    qkv: torch.Tensor,
    num_heads: int,
    scale: float | None,
    head_scale: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    bounds: Sequence[int] | None = None,
) -> tuple[int, float, list[int] | None]:
    """(head_dim, scale, cu_seqlens as a list or None) after the shared and kernel checks."""
    capturing = qkv.is_cuda and torch.cuda.is_current_stream_capturing()
    head_dim, bounds = check_attention_inputs(
        qkv, num_heads, head_scale, cu_seqlens, max_seqlen, read_bounds=not capturing,
        bounds=bounds,
    )  # fmt: skip
    scale = _check_kernel_inputs((qkv,), head_dim, scale)
    if cu_seqlens is None and qkv.shape[1] > _MAX_TOKENS:
        raise ValueError(f"sequence length {qkv.shape[1]} exceeds {_MAX_TOKENS} tokens")
    return head_dim, scale, bounds


def _check_split(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None,
    head_scale: torch.Tensor | None,
) -> tuple[int, float]:
    """(head_dim, scale) after the shared and kernel checks."""
    check_split_attention_inputs(query, key, value, head_scale)
    head_dim = query.shape[-1]
    scale = _check_kernel_inputs((query, key, value), head_dim, scale)
    if query.shape[2] > _MAX_TOKENS:
        raise ValueError(f"sequence length {query.shape[2]} exceeds {_MAX_TOKENS} tokens")
    return head_dim, scale


def _check_kernel_inputs(
    tensors: tuple[torch.Tensor, ...], head_dim: int, scale: float | None
) -> float:
    """What only the kernel needs (the reference takes any of these); returns the scale."""
    dtype = tensors[0].dtype
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"dtype {dtype} unsupported; use float16, bfloat16 or float32")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} unsupported; supported: {SUPPORTED_HEAD_DIMS}")
    for t in tensors:
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError("the attention kernel needs inputs contiguous in the last dim")
        if t.dim() > 1 and t.stride(-2) * _MAX_BLOCK >= 2**31:
            # Offsets inside one block are int32; only an exotic layout gets this far.
            raise ValueError(f"token stride {t.stride(-2)} is too large; use a denser layout")
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not 0 < scale < math.inf:
        # The kernel takes the row maximum before scaling, which needs a positive scale.
        raise ValueError(f"scale must be positive and finite, got {scale}")
    return scale


def _output(
    out: torch.Tensor | None,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    like: torch.Tensor,
    inputs: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """``out`` checked (shape, dtype, heads at stride Dh, no overlap with inputs), or new."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=like.device)
    head_dim = like.shape[-1] if like.dim() == 4 else None
    if (
        tuple(out.shape) != shape
        or out.dtype != dtype
        or out.stride(-1) != 1
        or (head_dim is not None and out.stride(-2) != head_dim)
    ):
        raise ValueError(f"out must be {shape} {dtype} with a contiguous last dim")
    if out.stride(-3 if head_dim else -2) * _MAX_BLOCK >= 2**31:
        raise ValueError("out's token stride is too large; use a denser out")
    check_no_shared_storage(out, inputs)
    return out


def _lse(lse: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    if lse is None:
        return torch.empty(shape, dtype=torch.float32, device=like.device)
    if tuple(lse.shape) != shape or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be a contiguous float32 tensor of shape {shape}")
    return lse


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
    config: AttentionConfig | None = None,
    bounds: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention on the packed QKV projection; returns (out, lse).

    qkv is (B, N, 3*H*Dh) viewed as (B, N, 3, H, Dh), any strides in B and N; out is
    (B, N, H*Dh) and lse (fp32, natural log) is (B, H, N). With cu_seqlens (integer
    (S+1,), from 0; int32 for the kernel) qkv is (total, 3*H*Dh), each sequence attends
    within itself, out is (total, H*Dh) and lse is (H, total). Outside CUDA-graph capture
    cu_seqlens is read on the host to validate it (and to find max_seqlen when not given);
    under capture it is not read, max_seqlen is required, and bounds that were wrong leave
    rows unwritten but never touch memory outside the tensors. float32 is exact and meant
    for the interpreter: on CUDA its tiles spill (ops.attention sends it to SDPA).
    head_scale, (H,) or (B, H) ((S, H) with cu_seqlens), multiplies each head's output.
    scale defaults to 1/sqrt(Dh). ``out`` (last dim contiguous) and ``lse`` (contiguous),
    when given, receive the results. ``config`` launches that configuration as given;
    None lets Triton's autotuner pick among ``candidate_configs`` (a fixed config under the
    interpreter). ``bounds``, cu_seqlens' values as host integers where the caller built it
    from them, are validated instead of reading the device (no host sync).
    """
    if head_scale is None and cu_seqlens is None and out is None and lse is None:
        layout = (qkv.shape, qkv.stride(), qkv.dtype, qkv.device, num_heads, scale, max_seqlen)
        dense = _checked_once(
            ("packed", *layout, config), _dense_launch, qkv, num_heads, scale, max_seqlen, config
        )
        out = torch.empty(dense.out_shape, dtype=qkv.dtype, device=qkv.device)
        lse = torch.empty(dense.lse_shape, dtype=torch.float32, device=qkv.device)
        if dense.launch is not None:
            record_launch("attention")
            dense.launch(qkv, qkv, qkv, out, lse, *dense.tail)
        return out, lse
    head_dim, scale, bounds = _check_packed(
        qkv, num_heads, scale, head_scale, cu_seqlens, max_seqlen, bounds
    )
    tokens = qkv.shape[-2]
    if cu_seqlens is None:
        max_seqlen = tokens
        lse_shape = (qkv.shape[0], num_heads, tokens)
    else:
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.device != qkv.device:
            raise ValueError("the attention kernel needs cu_seqlens as int32 on qkv's device")
        # The kernel reads the bounds with stride 1.
        cu_seqlens = cu_seqlens.contiguous()
        if max_seqlen is None:
            if bounds is None:
                raise ValueError("max_seqlen is required with cu_seqlens under CUDA-graph capture")
            max_seqlen = max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
        lse_shape = (num_heads, tokens)
        if max_seqlen > _MAX_TOKENS:
            raise ValueError(f"sequence length {max_seqlen} exceeds {_MAX_TOKENS} tokens")
    out = _output(out, (*qkv.shape[:-1], num_heads * head_dim), qkv.dtype, qkv, (qkv,))
    lse = _lse(lse, lse_shape, qkv)
    if out.numel() and max_seqlen:
        launch = _packed_launch(
            qkv, num_heads, head_dim, scale, head_scale, cu_seqlens, max_seqlen, out, lse
        )
        _run(launch, qkv.device, config)
    return out, lse


def flash_attention_split(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None = None,
    head_scale: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    config: AttentionConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention on separate q, k, v; returns (out, lse).

    query, key and value are (B, H, N, Dh) with any strides in B, H and N (transformers'
    views of three projections), read in place; out is (B, N, H, Dh) (transformers'
    attention-function output) and lse (fp32, natural log) is (B, H, N). ``head_scale``,
    ``scale``, ``out``, ``lse`` and ``config`` as for ``flash_attention``; a given ``out``
    must have its heads at stride Dh.
    """
    if head_scale is None:
        layout = (
            "split", query.shape, key.shape, value.shape, query.stride(), key.stride(),
            value.stride(), query.dtype, key.dtype, value.dtype, query.device, key.device,
            value.device, scale,
        )  # fmt: skip
        head_dim, scale = _checked_once(layout, _check_split, query, key, value, scale, None)
    else:
        head_dim, scale = _check_split(query, key, value, scale, head_scale)
    batch, num_heads, tokens, _ = query.shape
    inputs = (query, key, value)
    out = _output(out, (batch, tokens, num_heads, head_dim), query.dtype, query, inputs)
    lse = _lse(lse, (batch, num_heads, tokens), query)
    if out.numel():
        _run(_split_launch(query, key, value, scale, head_scale, out, lse), query.device, config)
    return out, lse


def _split_launch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    head_scale: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> _Launch:
    """The launch for (B, H, N, Dh) q, k, v, read in place."""
    batch, num_heads, tokens, head_dim = query.shape
    (qb, qh, qt, _), (kb, kh, kt, _), (vb, vh, vt, _) = query.stride(), key.stride(), value.stride()
    strides = (qb, qt, qh, kb, kt, kh, vb, vt, vh)  # (batch, token, head) each
    return _prepare(
        query, key, value, (0, 0, 0), strides, out, (out.stride(0), out.stride(1)), lse,
        head_scale, None, scale, num_heads, head_dim, batch, tokens, tokens,
    )  # fmt: skip


# The launches of the default models (DINOv2 small/base/large/giant: 6/12/16/24 heads of
# 64) that the compile report must compile: 224 px (257 tokens, 261 with registers) and
# 518 px (1370), batch 1 and 64, fp16 and bf16, with and without head_scale (head_mask),
# batched and varlen, packed qkv (the fused model, optimize()) and transformers' separate
# q/k/v views (attn_implementation="dinov2_fast").
_MODEL_HEAD_DIM = 64
_MODEL_HEADS = (6, 12, 16, 24)
_MODEL_TOKENS = (257, 261, 1370)
_MODEL_BATCHES = (1, 64)
# The other supported head dims get one representative launch each: batched packed qkv.
_OTHER_HEADS, _OTHER_TOKENS, _OTHER_BATCH = 8, 257, 2


def _launches(
    dtype: torch.dtype, heads: int, head_dim: int, tokens: int, batch: int, every_kind: bool
) -> list[tuple[str, _Launch]]:
    """(kind, launch) for one model shape, built by the launchers' own argument builders on
    meta tensors: packed batched, and with ``every_kind`` also with head_scale, varlen and
    transformers' split q/k/v."""
    meta = {"dtype": dtype, "device": "meta"}
    width, scale = heads * head_dim, head_dim**-0.5
    qkv = torch.empty(batch, tokens, 3 * width, **meta)
    out = torch.empty(batch, tokens, width, **meta)
    lse = torch.empty(batch, heads, tokens, device="meta")
    packed = _packed_launch(qkv, heads, head_dim, scale, None, None, tokens, out, lse)
    if not every_kind:
        return [("packed", packed)]
    launches = []
    cu_seqlens = torch.empty(batch + 1, dtype=torch.int32, device="meta")
    varlen_lse = torch.empty(heads, batch * tokens, device="meta")
    # transformers' (B, N, H*Dh) projections viewed as (B, H, N, Dh).
    query, key, value = (
        torch.empty(batch, tokens, width, **meta).unflatten(-1, (heads, head_dim)).transpose(1, 2)
        for _ in range(3)
    )
    split_out = out.unflatten(-1, (heads, head_dim))
    for head_scale in (None, torch.empty(heads, **meta)):
        flag = "" if head_scale is None else " head_scale"
        launches += [
            (
                "packed" + flag,
                _packed_launch(qkv, heads, head_dim, scale, head_scale, None, tokens, out, lse),
            ),
            (
                "packed varlen" + flag,
                _packed_launch(
                    qkv.flatten(0, 1), heads, head_dim, scale, head_scale, cu_seqlens, tokens,
                    out.flatten(0, 1), varlen_lse,
                ),
            ),
            ("split" + flag, _split_launch(query, key, value, scale, head_scale, split_out, lse)),
        ]  # fmt: skip
    return launches


def _report_launches(dtype: torch.dtype) -> list[tuple[str, _Launch]]:
    launches = []
    for heads in _MODEL_HEADS:
        for tokens in _MODEL_TOKENS:
            for batch in _MODEL_BATCHES:
                launches += _launches(dtype, heads, _MODEL_HEAD_DIM, tokens, batch, True)
    for head_dim in SUPPORTED_HEAD_DIMS:
        if head_dim != _MODEL_HEAD_DIM:
            launches += _launches(dtype, _OTHER_HEADS, head_dim, _OTHER_TOKENS, _OTHER_BATCH, False)
    return launches


def compile_specs(arch: int) -> list[KernelSpec]:
    """Every compile the AOT report must check on sm_<arch>: each candidate config against
    each distinct signature the default models launch, and against a representative
    launch of each other supported head_dim, fp16 and bf16. Signatures come from the
    launchers' own argument builders through Triton's own specialisation, so the report
    compiles what runs. Identical compiles are listed once, labelled with every launch
    kind they serve. ``extra["attrs"]`` holds the ASTSource attrs."""
    kernel = _attention_fwd_kernel
    compiles: dict[tuple, tuple[str, AttentionConfig, tuple, list[str]]] = {}
    for dtype, dtype_name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        for kind, launch in _report_launches(dtype):
            head_dim = launch.constexprs["HEAD_DIM"]
            for config in candidate_configs(arch, head_dim):
                kwargs = {**launch.constexprs, **config._launch_options}
                compiled = jit_specialization(kernel, launch.args, kwargs, arch)
                signature, constexprs, attrs = compiled
                key = (
                    config,
                    tuple(signature.items()),
                    tuple((k, str(v)) for k, v in constexprs.items()),
                    tuple((k, str(v)) for k, v in attrs.items()),
                )
                prefix = f"{dtype_name} d{head_dim} {config.name}"
                kinds = compiles.setdefault(key, (prefix, config, compiled, []))[3]
                if kind not in kinds:
                    kinds.append(kind)
    return [
        KernelSpec(
            name="attention",
            fn=kernel,
            signature=signature,
            constexprs=constexprs,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
            label=f"{prefix} {' | '.join(kinds)}",
            extra={"attrs": attrs},
        )
        for prefix, config, (signature, constexprs, attrs), kinds in compiles.values()
    ]
