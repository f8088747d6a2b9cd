"""Tier 2: the ahead-of-time compile report (DESIGN.md §5), and proof that it can fail.

The report compiles real kernels, so it runs in a subprocess without TRITON_INTERPRET
(interpreted kernels cannot be compiled). This module doubles as a kernel module for the
report: ``compile_specs`` below yields deliberately broken configs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton
import triton.language as tl

from dinov2_fast.kernels._common import KernelSpec
from dinov2_fast.kernels.report import CompileResult, problems

TESTS = Path(__file__).parent
LIBRARY_KERNELS = ("layer_norm", "add_layerscale_layernorm", "swiglu", "gelu", "attention")


def _report(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "dinov2_fast.kernels.report", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_report_passes_for_every_library_kernel(arch: str) -> None:
    result = _report("--arch", arch)
    assert result.returncode == 0, result.stdout + result.stderr
    kernels_listed = {line.split()[0] for line in result.stdout.splitlines()[2:] if line.strip()}
    assert set(LIBRARY_KERNELS) <= kernels_listed


@triton.jit
def _spilling_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    # One warp holding 16k fp32 values (512 per thread) cannot stay in registers.
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets)
    tl.store(out_ptr + offsets, tl.cumsum(x * x, axis=0) + x)


def compile_specs(arch: int) -> list[KernelSpec]:
    """A config the report must reject (shared-memory and wgmma checks: see below)."""
    return [
        KernelSpec(
            name="spilling",
            fn=_spilling_kernel,
            signature={"x_ptr": "*fp32", "out_ptr": "*fp32"},
            constexprs={"BLOCK": 16384},
            num_warps=1,
            num_stages=1,
            label="16k fp32 in one warp",
        ),
    ]


def test_report_fails_on_a_spilling_config() -> None:
    result = _report("--arch", "sm_90", "--module", "test_report")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[2:] if line.strip()}
    assert "spills" in lines["spilling"]


def test_report_fails_on_a_missing_module() -> None:
    result = _report("--arch", "sm_90", "--module", "dinov2_fast.kernels.no_such_kernel")
    assert result.returncode == 1
    assert "no_such_kernel" in result.stdout


def _result(**overrides: object) -> CompileResult:
    fields = {
        "module": "dinov2_fast.kernels.attention",
        "kernel": "attention",
        "config": "c",
        "registers": 128,
        "stack_bytes": 0,
        "local_bytes": 0,
        "shared_bytes": 64 * 1024,
        "wgmma": True,
    }
    return CompileResult(**{**fields, **overrides})


def test_problems_names_each_violation() -> None:
    assert problems(_result(), 90) == []
    assert problems(_result(wgmma=None), 80) == []
    assert "spills" in problems(_result(stack_bytes=8), 90)[0]
    assert "local memory" in problems(_result(local_bytes=4), 80)[0]
    assert "shared memory" in problems(_result(shared_bytes=200 * 1024), 80)[0]
    assert problems(_result(shared_bytes=200 * 1024), 90) == []
    assert "wgmma" in problems(_result(wgmma=False), 90)[0]
    assert problems(_result(module="dinov2_fast.kernels.gelu", wgmma=False), 90) == []
    assert "compile failed" in problems(_result(error="boom"), 90)[0]


_SIGNATURE_CHECK = """
import random
import torch
from dinov2_fast.kernels import attention as A
from dinov2_fast.kernels._common import jit_specialization

arch = 90
specs = A.compile_specs(arch)
labels = [s.label for s in specs]
assert len(labels) == len(set(labels)), "duplicate compiles"
compiled = {
    (s.label.split()[2], tuple(s.signature.items()), str(s.constexprs), str(s.extra["attrs"]))
    for s in specs
}
for config in A.candidate_configs(arch, 64):
    for kinds in ["packed | split", "packed varlen", "packed head_scale | split head_scale",
                  "packed varlen head_scale"]:
        for dtype in ["fp16", "bf16"]:
            assert f"{dtype} d64 {config.name} {kinds}" in labels, (config.name, kinds)
kernel = A._attention_fwd_kernel
# Shapes of the default models at batch sizes compile_specs never built: the JIT must
# specialise them to a compile the report checked.
rng = random.Random(0)
for _ in range(12):
    dtype = rng.choice([torch.float16, torch.bfloat16])
    heads, tokens = rng.choice(A._MODEL_HEADS), rng.choice(A._MODEL_TOKENS)
    batch = rng.randint(2, 63)
    for kind, launch in A._launches(dtype, heads, 64, tokens, batch, True):
        config = rng.choice(A.candidate_configs(arch, 64))
        kwargs = {**launch.constexprs, **config._launch_options}
        signature, constexprs, attrs = jit_specialization(kernel, launch.args, kwargs, arch)
        key = (config.name, tuple(signature.items()), str(constexprs), str(attrs))
        assert key in compiled, (kind, heads, tokens, batch, config.name)
print("ok", len(specs))
"""


def test_attention_specs_cover_every_default_model_launch() -> None:
    """compile_specs lists each candidate x launch kind once, and a default model's launch
    at any batch size specialises to one of its compiles (run without the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _SIGNATURE_CHECK], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
