"""Kernel suite: each fused op at DINOv2 shapes against eager PyTorch, torch.compile of the
reference, every SDPA backend and xformers; GB/s for memory-bound ops, TFLOP/s for attention."""

import torch

from bench import harness
from bench.cases import SDPA_PROVIDERS, Case, unavailable
from bench.kernels import fp32_reference, implementation, workload

# A 400k-cycle lead (about 0.2 ms on an H100) covers the host's launch of one op.
GPU_SCHEDULE = harness.Schedule(warmup=5, rounds=10, iterations=10, lead_cycles=400_000)


@torch.no_grad()
def test_kernel(
    kernel_case: Case, device: torch.device, results: harness.ResultsFile, benchmark
) -> None:
    setting, provider = kernel_case.setting, kernel_case.provider
    load = workload(kernel_case, device)
    row = {
        "kernel": kernel_case.kernel,
        "shape": load.shape,
        "model": setting.spec.name,
        "image_size": setting.image_size,
        "batch": setting.batch,
        "dtype": harness.DTYPE_NAMES[setting.dtype],
        "provider": provider,
    }
    benchmark.group = (
        f"{device.type.upper()} kernel {kernel_case.kernel} {load.shape} {row['dtype']}"
    )
    benchmark.extra_info.update(row, device=device.type)
    reason = unavailable(provider, device)
    if reason is not None:
        harness.skip_with_row(results, "kernels", row, reason)
    with harness.recording_failure(results, "kernels", row):
        run = implementation(kernel_case)
        try:
            out = run(load.arguments[0])  # compiles and autotunes, outside the timing
        except RuntimeError as error:
            # SDPA raises when the chosen backend does not take this input or device.
            if provider not in SDPA_PROVIDERS:
                raise
            harness.skip_with_row(results, "kernels", row, f"{provider}: {error}"[:200])
        max_rel_err = harness.relative_error(out, fp32_reference(kernel_case, load.arguments[0]))
        del out
        schedule = GPU_SCHEDULE if device.type == "cuda" else harness.CPU_SCHEDULE
        timing = harness.measure(run, load.arguments, device, schedule, benchmark)
    seconds = timing.median_ms * 1e-3
    measured = results.add(
        "kernels",
        **row,
        latency_ms=timing.median_ms,
        gbps=None if load.bytes_moved is None else load.bytes_moved / seconds / 1e9,
        tflops=None if load.flops is None else load.flops / seconds / 1e12,
        max_rel_err=max_rel_err,
    )
    benchmark.extra_info.update(measured)
    assert measured["latency_ms"] > 0
