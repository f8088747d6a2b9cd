"""Ahead-of-time compile report: every kernel config compiled for a GPU on this CPU.

    python -m dinov2_fast.kernels.report --arch sm_90

compiles every kernel spec (each kernel module's ``compile_specs(arch)``: every autotune
config, fp16 and bf16) with Triton's bundled ptxas, reads registers, stack, local and shared
memory with ``cuobjdump --dump-resource-usage`` and, on sm_90, looks for Hopper's HGMMA
(wgmma) instructions with ``nvdisasm`` in the kernels that must use them (attention).
Exits 1 if any config spills or uses local memory, needs more shared memory than one block
may have, or if an attention config on sm_90 lacks wgmma, or if a module cannot be
compiled at all. Run it without TRITON_INTERPRET (it re-executes itself without it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ._common import KernelSpec, interpreting

KERNEL_MODULES = (
    "dinov2_fast.kernels.layernorm",
    "dinov2_fast.kernels.swiglu",
    "dinov2_fast.kernels.gelu",
    "dinov2_fast.kernels.attention",
)
# Modules whose every sm_90 config must use wgmma: without it Hopper's tensor cores are
# expected to go unused (not yet benchmarked).
WGMMA_MODULES = ("dinov2_fast.kernels.attention",)
# Largest shared memory one block may opt into.
SHARED_LIMIT_BYTES = {80: 163 * 1024, 90: 227 * 1024}

_RESOURCE_LINE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclass(frozen=True)
class CompileResult:
    """Resources of one compiled spec, as ptxas laid it out."""

    module: str
    kernel: str
    config: str
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int
    wgmma: bool | None
    error: str | None = None


def problems(result: CompileResult, arch: int) -> list[str]:
    """Why ``result`` fails the report on ``arch`` (empty when it passes)."""
    if result.error is not None:
        return [f"compile failed: {result.error}"]
    found = []
    if result.stack_bytes > 0:
        found.append(f"spills ({result.stack_bytes} B stack)")
    if result.local_bytes > 0:
        found.append(f"uses {result.local_bytes} B local memory")
    limit = SHARED_LIMIT_BYTES[arch]
    if result.shared_bytes > limit:
        found.append(f"shared memory {result.shared_bytes} B > {limit} B")
    if arch >= 90 and result.module in WGMMA_MODULES and not result.wgmma:
        found.append("no wgmma on sm_90")
    return found


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _compile(module: str, spec: KernelSpec, arch: int) -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget

    config = spec.label
    try:
        source = triton.compiler.ASTSource(
            fn=spec.fn,
            signature={**spec.signature, **dict.fromkeys(spec.constexprs, "constexpr")},
            constexprs=spec.constexprs,
            attrs=spec.extra.get("attrs"),
        )
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "kernel.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = subprocess.run(
                [_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            wgmma = None
            # Disassembly is the slow step: only where wgmma is required.
            if arch >= 90 and module in WGMMA_MODULES:
                sass = subprocess.run(
                    [_tool("nvdisasm"), str(cubin)], capture_output=True, text=True, check=True
                ).stdout
                wgmma = "HGMMA" in sass
    except Exception as e:  # noqa: BLE001 - any failure to compile is a reportable finding
        return CompileResult(
            module, spec.name, config, 0, 0, 0, 0, None, f"{type(e).__name__}: {e}"
        )
    match = _RESOURCE_LINE.search(usage)
    if match is None:
        return CompileResult(module, spec.name, config, 0, 0, 0, 0, None, "no resource line")
    registers, stack, static_shared, local = map(int, match.groups())
    # Triton's shared memory is dynamic (metadata.shared); ptxas adds any static part.
    shared = compiled.metadata.shared + static_shared
    return CompileResult(module, spec.name, config, registers, stack, local, shared, wgmma)


_WORK: list[tuple[str, KernelSpec]] = []


def _compile_indexed(index_and_arch: tuple[int, int]) -> CompileResult:
    index, arch = index_and_arch
    module, spec = _WORK[index]
    return _compile(module, spec, arch)


def collect(modules: list[str], arch: int) -> tuple[list[tuple[str, KernelSpec]], list[str]]:
    """(module, spec) pairs from every module's ``compile_specs(arch)``, and import errors."""
    work, errors = [], []
    for name in modules:
        try:
            specs = importlib.import_module(name).compile_specs(arch)
        except Exception as e:  # noqa: BLE001 - a missing or broken module fails the report
            errors.append(f"{name}: {type(e).__name__}: {e}")
            continue
        if not specs:
            errors.append(f"{name}: compile_specs({arch}) returned no specs")
        work.extend((name, spec) for spec in specs)
    return work, errors


def run(modules: list[str], arch: int, jobs: int) -> tuple[list[CompileResult], list[str]]:
    """Compile every spec of ``modules`` for ``arch``; return results and module errors."""
    work, errors = collect(modules, arch)
    _WORK[:] = work
    tasks = [(i, arch) for i in range(len(work))]
    if jobs > 1 and len(work) > 1:
        # fork: the specs hold kernel objects that do not pickle; children index _WORK.
        context = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            results = list(pool.map(_compile_indexed, tasks))
    else:
        results = [_compile_indexed(task) for task in tasks]
    return results, errors


def format_table(results: list[CompileResult], arch: int) -> str:
    header = ("kernel", "config", "regs", "stack", "local", "shared", "wgmma", "status")
    rows = [header]
    for r in results:
        wgmma = "-" if r.wgmma is None else ("yes" if r.wgmma else "no")
        status = "; ".join(problems(r, arch)) or "ok"
        rows.append(
            (
                r.kernel,
                r.config,
                str(r.registers),
                str(r.stack_bytes),
                str(r.local_bytes),
                str(r.shared_bytes),
                wgmma,
                status,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    )


def _parse_arch(text: str) -> int:
    arch = int(text.removeprefix("sm_"))
    if arch not in SHARED_LIMIT_BYTES:
        raise argparse.ArgumentTypeError(f"arch must be one of sm_80, sm_90; got {text}")
    return arch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=_parse_arch, required=True, help="sm_80 or sm_90")
    parser.add_argument(
        "--module",
        action="append",
        help="kernel module to compile (repeatable; default: every library kernel)",
    )
    parser.add_argument(
        "--jobs", type=int, default=min(os.cpu_count() or 1, 8), help="parallel compiles"
    )
    args = parser.parse_args(argv)
    if interpreting():
        # Interpreted kernels cannot be compiled: rerun without the interpreter.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        command = [sys.executable, "-m", "dinov2_fast.kernels.report", *(argv or sys.argv[1:])]
        return subprocess.run(command, env=env).returncode
    results, errors = run(args.module or list(KERNEL_MODULES), args.arch, args.jobs)
    print(f"sm_{args.arch}: {len(results)} configs")
    print(format_table(results, args.arch))
    failed = [r for r in results if problems(r, args.arch)]
    for error in errors:
        print(f"error: {error}")
    print(f"{len(failed)} failing configs, {len(errors)} module errors")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
