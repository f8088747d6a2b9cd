"""Model suite: images/s, latency, peak GPU memory, MFU and the error against the fp32
reference, for every provider of the same weights (bench/README.md defines each column)."""

import gc
import time

import torch

from bench import harness
from bench.cases import TRITON_PROVIDERS, Case, unavailable
from bench.models import Workbench, build, model_flops
from dinov2_fast.kernels._common import count_launches

GPU_SCHEDULE = harness.Schedule(warmup=3, rounds=5, iterations=3)


def _release(device: torch.device) -> None:
    """Free what a provider left behind (compiled graphs keep their model alive)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def test_model(
    model_case: Case,
    device: torch.device,
    results: harness.ResultsFile,
    workbench: Workbench,
    benchmark,
) -> None:
    setting, provider = model_case.setting, model_case.provider
    config = setting.spec.config()
    row = {
        "model": setting.spec.name,
        "patch_size": config.patch_size,
        "image_size": setting.image_size,
        "batch": setting.batch,
        "dtype": harness.DTYPE_NAMES[setting.dtype],
        "provider": provider,
    }
    benchmark.group = f"{device.type.upper()} model {setting.label}"
    benchmark.extra_info.update(row, device=device.type)
    reason = unavailable(provider, device)
    if reason is not None:
        harness.skip_with_row(results, "model", row, reason)
    on_gpu = device.type == "cuda"
    try:
        with harness.recording_failure(results, "model", row):
            inputs, expected = workbench.batches(setting)
            cuda_graphs = provider == "dinov2_fast+cudagraph"
            with harness.peak_memory(device, cuda_graphs=cuda_graphs) as memory:
                # The provider's own copy of the weights, counted in its memory once: no
                # reference to it is kept here (build's model holds the only ones).
                forward = build(provider, config, workbench.weights(setting))
                with count_launches() as launches:
                    started = time.perf_counter()
                    out = forward(inputs[0])
                    harness.synchronize(device)
                    first_call_s = time.perf_counter() - started
                if provider in TRITON_PROVIDERS and not launches["attention"]:
                    raise AssertionError(f"{provider} launched no Triton kernel: a fallback")
                # Compared on the host, so the comparison's buffers stay out of the count.
                out = out.cpu()
                # Steady state from here: the first call's compile, autotuning, packing and
                # capture workspaces are not charged; what they left allocated still is.
                memory.steady_state()
                schedule = GPU_SCHEDULE if on_gpu else harness.CPU_SCHEDULE
                timing = harness.measure(forward, inputs, device, schedule, benchmark)
            max_rel_err = harness.relative_error(out, expected, per_item=True)
    finally:
        forward = None
        _release(device)
    seconds = timing.median_ms * 1e-3
    peak_tflops = results.peaks["bf16_tflops"]
    flops = setting.batch * model_flops(config, setting.height, setting.width)
    measured = results.add(
        "model",
        **row,
        images_per_s=setting.batch / seconds,
        latency_ms=timing.median_ms,
        peak_mem_mb=memory.allocated_mb,
        mfu=None if peak_tflops is None else flops / seconds / (peak_tflops * 1e12),
        max_rel_err=max_rel_err,
        compile_s=first_call_s,
    )
    benchmark.extra_info.update(measured)
    assert measured["images_per_s"] > 0
