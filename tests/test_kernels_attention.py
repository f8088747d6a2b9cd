"""Flash-attention kernel vs its reference twin (tier 1: interpreter or GPU; tier 3: GPU only).

The yardstick of the 2x rule is the tightest attention PyTorch can do in that dtype with a
flash kernel's one unavoidable rounding: fp32 scores and softmax, probabilities rounded to
the input dtype before an fp32-accumulated product with v.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from _numerics import assert_close_2x

from dinov2_fast import reference
from dinov2_fast.kernels import attention
from dinov2_fast.kernels._common import count_launches
from dinov2_fast.kernels.attention import (
    SUPPORTED_HEAD_DIMS,
    AttentionConfig,
    candidate_configs,
    flash_attention,
    flash_attention_split,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _packed_qkv(
    batch: int,
    tokens: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    *,
    strided: bool = False,
) -> torch.Tensor:
    """Random (B, N, 3*H*Dh) qkv; strided makes it a view into a larger buffer (B, N, width)."""
    width = 3 * heads * head_dim
    if not strided:
        return torch.randn(batch, tokens, width, device=DEVICE).to(dtype)
    buffer = torch.randn(2 * batch, tokens + 3, width + 32, device=DEVICE).to(dtype)
    return buffer[::2, 3:, 16 : 16 + width]


def _split(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, tokens, width = qkv.shape
    head_dim = width // (3 * heads)
    return qkv.unflatten(-1, (3, heads, head_dim)).permute(2, 0, 3, 1, 4).unbind(0)


def _flash_like_attention(
    qkv: torch.Tensor, heads: int, scale: float | None, head_scale: torch.Tensor | None
) -> torch.Tensor:
    """Attention in qkv's dtype rounded only where a flash kernel must (the 2x yardstick)."""
    q, k, v = (t.float() for t in _split(qkv, heads))
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    weights = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
    out = weights.to(qkv.dtype).float() @ v
    if head_scale is not None:
        out = out * head_scale.reshape(-1, heads, 1, 1).float()
    return out.to(qkv.dtype).transpose(1, 2).flatten(2)


def _reference_lse(qkv: torch.Tensor, heads: int, scale: float | None) -> torch.Tensor:
    """(B, H, N) log-sum-exp of the scaled scores, in float64."""
    q, k, _ = _split(qkv.double(), heads)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    return torch.logsumexp((q @ k.transpose(-1, -2)) * scale, dim=-1)


def _assert_lse_close(lse: torch.Tensor, expected: torch.Tensor, atol: float = 1e-4) -> None:
    torch.testing.assert_close(lse.double(), expected, atol=atol, rtol=1e-5)


def _poisoned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _run(qkv: torch.Tensor, heads: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """One kernel launch into NaN-poisoned outputs, checked to be exactly one launch."""
    head_dim = qkv.shape[-1] // (3 * heads)
    cu_seqlens = kwargs.get("cu_seqlens")
    if cu_seqlens is None:
        lse_shape = (qkv.shape[0], heads, qkv.shape[1])
    else:
        lse_shape = (heads, qkv.shape[0])
    out = _poisoned((*qkv.shape[:-1], heads * head_dim), qkv.dtype)
    lse = _poisoned(lse_shape, torch.float32)
    with count_launches() as launches:
        result, result_lse = flash_attention(qkv, heads, out=out, lse=lse, **kwargs)
    assert launches["attention"] == 1
    assert result.data_ptr() == out.data_ptr() and result_lse.data_ptr() == lse.data_ptr()
    return out, lse


def _check_batched(
    qkv: torch.Tensor,
    heads: int,
    *,
    scale: float | None = None,
    head_scale: torch.Tensor | None = None,
    config: AttentionConfig | None = None,
) -> None:
    out, lse = _run(qkv, heads, scale=scale, head_scale=head_scale, config=config)
    exact_head_scale = None if head_scale is None else head_scale.double()
    ref = reference.attention(qkv.double(), heads, scale=scale, head_scale=exact_head_scale)
    assert_close_2x(out, ref, _flash_like_attention(qkv, heads, scale, head_scale), atol=1e-5)
    _assert_lse_close(lse, _reference_lse(qkv, heads, scale))


# (batch, tokens, heads, head_dim, dtype): the model's token counts (1 query, ragged tails,
# 224 px, 224 px + registers, 518 px), head_dim 64 plus the padded and wide ones.
BATCHED_CASES = [
    (1, 1, 1, 64, torch.float32),
    (3, 17, 6, 64, torch.float16),
    (1, 257, 6, 64, torch.float16),
    (3, 261, 1, 64, torch.float32),
    (1, 1370, 1, 64, torch.float16),
    (2, 128, 2, 64, torch.float16),
    (3, 17, 1, 48, torch.float32),
    (1, 257, 1, 96, torch.float16),
    (1, 130, 1, 128, torch.float16),
    (1, 261, 6, 64, torch.bfloat16),
]


@pytest.mark.parametrize(
    ("batch", "tokens", "heads", "head_dim", "dtype"),
    BATCHED_CASES,
    ids=[f"B{b}-N{n}-H{h}-d{d}-{str(t)[6:]}" for b, n, h, d, t in BATCHED_CASES],
)
def test_matches_reference(batch, tokens, heads, head_dim, dtype):
    _check_batched(_packed_qkv(batch, tokens, heads, head_dim, dtype), heads)


@pytest.mark.parametrize("head_dim", [32, 80])
def test_other_head_dims(head_dim):
    _check_batched(_packed_qkv(1, 70, 2, head_dim, torch.float16), 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_strided_qkv(dtype):
    qkv = _packed_qkv(3, 70, 2, 64, dtype, strided=True)
    assert not qkv.is_contiguous()
    _check_batched(qkv, 2)


def test_strided_out():
    qkv = _packed_qkv(2, 70, 2, 64, torch.float16)
    buffer = _poisoned((2, 80, 2 * 64 + 16), torch.float16)
    out = buffer[:, 5:75, 8 : 8 + 2 * 64]
    flash_attention(qkv, 2, out=out)
    ref = reference.attention(qkv.double(), 2)
    assert_close_2x(out, ref, _flash_like_attention(qkv, 2, None, None), atol=1e-5)
    assert torch.isnan(buffer[:, :5]).all() and torch.isnan(buffer[:, 75:]).all()
    assert torch.isnan(buffer[..., :8]).all() and torch.isnan(buffer[..., 8 + 128 :]).all()


@pytest.mark.parametrize("per_batch", [False, True], ids=["H", "BxH"])
def test_head_scale(per_batch):
    batch, heads = 3, 4
    if per_batch:
        # A transposed view: the kernel must follow the table's strides.
        head_scale = (torch.rand(heads, batch, device=DEVICE) * 2 - 0.5).t()
        assert not head_scale.is_contiguous()
    else:
        head_scale = torch.rand(heads, device=DEVICE) * 2 - 0.5
    _check_batched(_packed_qkv(batch, 33, heads, 64, torch.float16), heads, head_scale=head_scale)


def test_custom_scale():
    _check_batched(_packed_qkv(2, 65, 2, 64, torch.float32), 2, scale=0.37)


def test_default_scale_is_inverse_sqrt_head_dim():
    qkv = _packed_qkv(1, 40, 2, 48, torch.float32)
    default, default_lse = flash_attention(qkv, 2)
    explicit, explicit_lse = flash_attention(qkv, 2, scale=1 / math.sqrt(48))
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    torch.testing.assert_close(default_lse, explicit_lse, rtol=0, atol=0)


def _check_varlen(
    lengths: list[int],
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    *,
    head_scale: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    config: AttentionConfig | None = None,
) -> None:
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    qkv = _packed_qkv(1, bounds[-1], heads, head_dim, dtype)[0]
    out, lse = _run(
        qkv, heads, head_scale=head_scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
        config=config,
    )  # fmt: skip
    exact_head_scale = None if head_scale is None else head_scale.double()
    ref = reference.attention(
        qkv.double(), heads, head_scale=exact_head_scale, cu_seqlens=cu_seqlens
    )
    eager = []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        seq_scale = head_scale if head_scale is None or head_scale.dim() == 1 else head_scale[i]
        eager.append(_flash_like_attention(qkv[None, start:end], heads, None, seq_scale)[0])
        _assert_lse_close(lse[:, start:end], _reference_lse(qkv[None, start:end], heads, None)[0])
    assert_close_2x(out, ref, torch.cat(eager), atol=1e-5)


def test_varlen_unequal_lengths():
    _check_varlen([70, 1, 130, 17, 64], 2, 64, torch.float16)


def test_varlen_head_scale_and_given_max():
    heads = 3
    head_scale = torch.rand(4, heads, device=DEVICE)
    _check_varlen([5, 66, 1, 40], heads, 48, torch.float32, head_scale=head_scale, max_seqlen=66)


def test_varlen_shared_head_scale_with_empty_sequence():
    head_scale = torch.rand(2, device=DEVICE)
    _check_varlen([33, 0, 9], 2, 64, torch.float16, head_scale=head_scale)


def _bad_call(**overrides) -> None:
    args = {"qkv": _packed_qkv(2, 8, 2, 64, torch.float16), "num_heads": 2, **overrides}
    flash_attention(**args)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"qkv": torch.randn(8, 384, device=DEVICE)}, ValueError, "qkv must be"),
        ({"num_heads": 5}, ValueError, "not divisible"),
        ({"qkv": torch.randn(2, 8, 3 * 2 * 40, device=DEVICE)}, ValueError, "head_dim 40"),
        ({"qkv": torch.randn(2, 8, 384, device=DEVICE).long()}, TypeError, "dtype"),
        ({"qkv": torch.randn(2, 384, 8, device=DEVICE).transpose(1, 2)}, ValueError, "last dim"),
        ({"head_scale": torch.ones(3, device=DEVICE)}, ValueError, "head_scale must have shape"),
        ({"head_scale": torch.ones(3, 2, device=DEVICE)}, ValueError, "head_scale must have"),
        ({"out": torch.empty(2, 8, 64, device=DEVICE)}, ValueError, "out must be"),
        ({"lse": torch.empty(2, 8, 2, device=DEVICE)}, ValueError, "lse must be"),
        ({"scale": -0.125}, ValueError, "scale must be positive"),
    ],
    ids=[
        "2d-without-cu_seqlens",
        "width",
        "head_dim",
        "dtype",
        "strided-last-dim",
        "head_scale-shape",
        "head_scale-batch",
        "out-shape",
        "lse-shape",
        "negative-scale",
    ],
)
def test_rejects_bad_inputs(overrides, error, match):
    with pytest.raises(error, match=match):
        _bad_call(**overrides)


def _varlen_qkv() -> torch.Tensor:
    return _packed_qkv(1, 10, 2, 64, torch.float16)[0]


@pytest.mark.parametrize(
    ("cu_seqlens", "match"),
    [
        ([0, 4, 10], None),
        ([0, 6, 4, 10], "non-decreasing"),
        ([1, 4, 10], "start at 0"),
        ([0, 4, 9], "end at total"),
    ],
    ids=["int64", "decreasing", "start", "end"],
)
def test_rejects_bad_cu_seqlens(cu_seqlens, match):
    dtype = torch.int64 if match is None else torch.int32
    bounds = torch.tensor(cu_seqlens, dtype=dtype, device=DEVICE)
    with pytest.raises(ValueError, match=match or "int32"):
        flash_attention(_varlen_qkv(), 2, cu_seqlens=bounds)


def test_rejects_a_max_seqlen_shorter_than_a_sequence():
    bounds = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="6 tokens, more than max_seqlen=5"):
        flash_attention(_varlen_qkv(), 2, cu_seqlens=bounds, max_seqlen=5)


def test_ops_passes_max_seqlen_through():
    from dinov2_fast import ops

    qkv, bounds = _varlen_qkv(), torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    with count_launches() as launches:
        out = ops.attention(qkv, 2, cu_seqlens=bounds, max_seqlen=6)
    assert launches == {"attention": 1}
    expected = reference.attention(qkv.float(), 2, cu_seqlens=bounds)
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)


def test_rejects_3d_qkv_with_cu_seqlens():
    bounds = torch.tensor([0, 10], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="total"):
        flash_attention(_varlen_qkv()[None], 2, cu_seqlens=bounds)


def test_rejects_2d_cu_seqlens():
    bounds = torch.tensor([[0, 10]], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="1-D"):
        flash_attention(_varlen_qkv(), 2, cu_seqlens=bounds)


# Explicit configs: what a planner may time, each run exactly as given.

# (config, head_dim) for every candidate of every architecture: 64 for the 64-wide lists,
# 128 for the 128-wide ones.
_CANDIDATE_RUNS = sorted(
    {
        (config, 64 if head_dim <= 64 else 128)
        for arch in (80, 90)
        for head_dim in SUPPORTED_HEAD_DIMS
        for config in candidate_configs(arch, head_dim)
    },
    key=lambda run: (run[1], run[0].name),
)


class _LaunchSpy:
    """Stands in for the kernel object: records each launch's grid and keywords."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize(
    ("config", "head_dim"), _CANDIDATE_RUNS, ids=[f"{c.name}-d{d}" for c, d in _CANDIDATE_RUNS]
)
def test_every_candidate_config_runs_as_given(config, head_dim, monkeypatch):
    # 300 tokens: full key blocks, then a tail of 44 keys (several tail_n steps, the last
    # partial) and a last query block of 44 rows for every block size in the lists.
    spy = _LaunchSpy(attention._attention_fwd_kernel)
    monkeypatch.setattr(attention, "_attention_fwd_kernel", spy)
    heads, tokens = 1, 300
    _check_batched(_packed_qkv(1, tokens, heads, head_dim, torch.float16), heads, config=config)
    ((grid, kwargs),) = spy.launches
    assert grid == (heads, math.ceil(tokens / config.block_m))
    given = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "TAIL_N": config.tail_n}
    assert {k: kwargs[k] for k in given} == given
    assert (kwargs["num_warps"], kwargs["num_stages"]) == (config.num_warps, config.num_stages)


def test_config_names_round_trip():
    for config, _ in _CANDIDATE_RUNS:
        assert AttentionConfig.from_name(config.name) == config
    config = AttentionConfig(64, 64, 16, 4, 3)
    assert config.name == "m64n64t16w4s3"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.block_m = 128


@pytest.mark.parametrize(
    "name",
    ["", "m64n64t16w4", "m64n64t16w4s3x", "M64n64t16w4s3", "m064n64t16w4s3", "m63n64t16w4s3",
     "m64n64t128w4s3", "m64n64t8w4s3", "m64n64t16w3s3", "m64n64t16w4s0", 643],
)  # fmt: skip
def test_bad_config_names_are_refused(name):
    with pytest.raises(ValueError, match="config name|power of two|tail_n|num_"):
        AttentionConfig.from_name(name)


def test_candidate_configs_per_arch():
    for head_dim in SUPPORTED_HEAD_DIMS:
        for arch, served_by in [(80, 80), (86, 80), (89, 80), (90, 90), (100, 90), (70, 80)]:
            configs = candidate_configs(arch, head_dim)
            assert configs == candidate_configs(served_by, head_dim)
            assert configs and len(set(configs)) == len(configs)
            assert all(isinstance(c, AttentionConfig) for c in configs)
    # Defaults lead: today's 128x64 tile, now with a 16-wide tail.
    assert candidate_configs(90, 64)[0] == AttentionConfig(128, 64, 16, 4, 3)
    assert any(c.block_m == 64 for c in candidate_configs(90, 64))
    with pytest.raises(ValueError, match="head_dim 40"):
        candidate_configs(90, 40)


def test_a_given_config_reaches_the_interpreter_unchanged_on_varlen():
    config = AttentionConfig(128, 32, 16, 8, 2)
    _check_varlen([70, 1, 130, 17], 2, 64, torch.float16, config=config)


def test_batched_launch_reads_nothing_back_from_the_device(monkeypatch):
    """A steady-state launch never syncs: no .tolist() or .item() on the host path."""
    qkv = _packed_qkv(2, 17, 2, 64, torch.float16)
    flash_attention(qkv, 2)

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a device tensor")

    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    flash_attention(qkv, 2)
    q, k, v = _split(qkv, 2)
    flash_attention_split(q, k, v)


# Separate q, k, v: transformers' (B, H, N, Dh) views of three projections, read in place.


def _split_views(batch, tokens, heads, head_dim, dtype):
    """(B, H, N, Dh) views of three (B, N, H*Dh) projections, as transformers makes them."""
    return tuple(
        torch.randn(batch, tokens, heads * head_dim, device=DEVICE)
        .to(dtype)
        .unflatten(-1, (heads, head_dim))
        .transpose(1, 2)
        for _ in range(3)
    )


def _check_split(query, key, value, *, head_scale=None, config=None):
    batch, heads, tokens, head_dim = query.shape
    out = _poisoned((batch, tokens, heads, head_dim), query.dtype)
    lse = _poisoned((batch, heads, tokens), torch.float32)
    with count_launches() as launches:
        flash_attention_split(query, key, value, head_scale=head_scale, out=out, lse=lse)
    assert launches == {"attention": 1}
    # The packed twin of the same q, k, v is the yardstick (a copy made by the test only).
    qkv = torch.cat([t.transpose(1, 2).flatten(2) for t in (query, key, value)], dim=-1)
    exact_head_scale = None if head_scale is None else head_scale.double()
    ref = reference.attention(qkv.double(), heads, head_scale=exact_head_scale)
    expected = _flash_like_attention(qkv, heads, None, head_scale)
    assert_close_2x(out.flatten(2), ref, expected, atol=1e-5)
    _assert_lse_close(lse, _reference_lse(qkv, heads, None))


@pytest.mark.parametrize(
    ("tokens", "dtype"),
    [(1, torch.float32), (17, torch.float16), (261, torch.float16), (257, torch.bfloat16)],
    ids=["N1-fp32", "N17-fp16", "N261-fp16", "N257-bf16"],
)
def test_split_matches_reference(tokens, dtype):
    _check_split(*_split_views(1, tokens, 2, 64, dtype))


def test_split_takes_three_different_layouts_and_head_scale():
    batch, heads, tokens, head_dim = 2, 3, 70, 48
    query = torch.randn(batch, heads, tokens, head_dim, device=DEVICE)  # contiguous (B,H,N,Dh)
    key = torch.randn(tokens, batch, heads, head_dim, device=DEVICE).permute(1, 2, 0, 3)
    value = torch.randn(2 * batch, heads, tokens + 5, head_dim, device=DEVICE)[::2, :, 5:]
    head_scale = torch.rand(batch, heads, device=DEVICE)
    _check_split(query, key, value, head_scale=head_scale)


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        (lambda q: (q, q, q[:, :, :-1]), "of one shape"),
        (lambda q: (q, q.half(), q), "share a dtype"),
        (lambda q: (q[0], q[0], q[0]), "of one shape"),
        (lambda q: (q.transpose(2, 3).contiguous().transpose(2, 3),) * 3, "last dim"),
    ],
    ids=["shape", "dtype", "3d", "strided-last-dim"],
)
def test_split_rejects_bad_inputs(tensors, match):
    query = torch.randn(2, 2, 17, 64, device=DEVICE)
    with pytest.raises((ValueError, TypeError), match=match):
        flash_attention_split(*tensors(query))


def test_non_contiguous_cu_seqlens_are_read_by_value():
    every_other = torch.tensor([0, 99, 4, 99, 10], dtype=torch.int32, device=DEVICE)[::2]
    qkv = _varlen_qkv()
    out, _ = _run(qkv, 2, cu_seqlens=every_other)
    expected, _ = flash_attention(qkv, 2, cu_seqlens=every_other.contiguous())
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# Tier 3: natively on a GPU, the model's shapes in bf16/fp16, cross-checked against SDPA.


def _sdpa(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    q, k, v = _split(qkv, heads)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("batch", "tokens", "heads"), [(8, 257, 6), (4, 1370, 12), (2, 5330, 6)])
def test_gpu_matches_sdpa(batch, tokens, heads, dtype):
    qkv = _packed_qkv(batch, tokens, heads, 64, dtype)
    out, lse = _run(qkv, heads)
    ref = reference.attention(qkv.double(), heads)
    # PyTorch's own flash attention in this dtype is the yardstick here.
    assert_close_2x(out, ref, _sdpa(qkv, heads), atol=1e-5)
    _assert_lse_close(lse, _reference_lse(qkv, heads, None), atol=1e-3)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [32, 48, 80, 96, 128])
def test_gpu_head_dims_bf16(head_dim):
    _check_batched(_packed_qkv(2, 261, 4, head_dim, torch.bfloat16), 4)


@gpu
@pytest.mark.gpu
def test_gpu_varlen_bf16():
    _check_varlen(
        [257, 1, 1370, 17, 261], 6, 64, torch.bfloat16, head_scale=torch.rand(5, 6, device=DEVICE)
    )


@gpu
@pytest.mark.gpu
def test_gpu_batch_heads_beyond_grid_y_limit():
    batch, heads = 11_000, 6  # 66,000 programs on axis 0
    qkv = _packed_qkv(batch, 17, heads, 64, torch.bfloat16)
    out, _ = _run(qkv, heads)
    assert_close_2x(out, reference.attention(qkv.double(), heads), _sdpa(qkv, heads), atol=1e-5)


@gpu
@pytest.mark.gpu
def test_gpu_offsets_beyond_int32():
    # 2^31 + elements in qkv: the last sequences start past the int32 offset range.
    heads, head_dim, tokens = 6, 64, 1370
    batch = (2**31) // (tokens * 3 * heads * head_dim) + 2
    qkv = torch.empty(batch, tokens, 3 * heads * head_dim, device=DEVICE, dtype=torch.bfloat16)
    qkv.normal_()
    assert qkv.numel() > 2**31
    out, lse = flash_attention(qkv, heads)
    tail = qkv[-2:]
    assert_close_2x(
        out[-2:], reference.attention(tail.double(), heads), _sdpa(tail, heads), atol=1e-5
    )
    _assert_lse_close(lse[-2:], _reference_lse(tail, heads, None), atol=1e-3)
