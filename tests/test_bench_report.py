"""The benchmark harness and report on synthetic numbers, so they cannot rot between GPU runs.

The numbers here are made up to exercise the code; they are never written to bench/results.
"""

import gc
import importlib.util
import json
import weakref

import pytest
import torch

import dinov2_fast
from bench import harness, report
from bench.cases import MATRICES, MODEL_PROVIDERS, TINY, Setting, kernel_cases, model_cases
from bench.models import Workbench, build, model_flops

SYNTHETIC_ENV = {
    "gpu": "Synthetic GPU (unit test)",
    "device": "cuda",
    "cpu": "none",
    "torch": "0",
    "triton": "0",
    "transformers": "0",
    "xformers": None,
    "commit": "0000000",
    "date": "2000-01-01T00:00:00Z",
}


def _model_row(provider, latency_ms, peak_mem_mb, model="dinov2-large", image=224, batch=64):
    return {
        "model": model,
        "patch_size": 14,
        "image_size": image,
        "batch": batch,
        "dtype": "bf16",
        "provider": provider,
        "images_per_s": batch / (latency_ms * 1e-3),
        "latency_ms": latency_ms,
        "peak_mem_mb": peak_mem_mb,
    }


def _synthetic_results(path):
    results = harness.ResultsFile(path, SYNTHETIC_ENV)
    results.set_peaks({"copy_gbps": 1000.0, "bf16_tflops": 500.0})
    results.add("model", **_model_row("dinov2_fast", 10.0, 900.0), max_rel_err=6e-3)
    results.add("model", **_model_row("hf-sdpa", 15.0, 1000.0), max_rel_err=5e-3)
    results.add("model", **_model_row("hf-compile", 12.0, 1100.0))
    results.add("model", **{**_model_row("xformers", 1.0, 1.0), "latency_ms": None},
                error="skipped: xformers is not installed")  # fmt: skip
    results.add("model", **_model_row("dinov2_fast+cudagraph", 1.0, 300.0, "dinov2-base", 224, 1))
    results.add("model", **_model_row("hf-eager", 2.5, 250.0, "dinov2-base", 224, 1))
    results.add(
        "kernels",
        kernel="layer_norm",
        shape="64x257x1024",
        dtype="bf16",
        provider="dinov2_fast",
        latency_ms=0.05,
        gbps=800.0,
    )
    results.add(
        "kernels",
        kernel="attention",
        shape="B=64 H=16 N=257 d=64",
        dtype="bf16",
        provider="sdpa-cudnn",
        error="RuntimeError: boom",
    )
    return results


def test_report_renders_headline_tables_and_plots(tmp_path):
    results = _synthetic_results(tmp_path / "synthetic-2000-01-01.json")
    written = report.render(results.path, tmp_path / "out")
    text = written[0].read_text()
    assert "Synthetic GPU (unit test)" in text
    assert "| 1.50x | >= 1.3x | met |" in text  # dinov2_fast vs hf-sdpa
    assert "| 1.20x | >= 1x | met |" in text  # vs hf-compile
    assert "| 2.50x | >= 3x | NOT met |" in text  # CUDA graphs vs eager at batch 1
    assert "| 0.90x | <= 1x | met |" in text  # peak memory vs hf-sdpa
    assert "| 1.20x | <= 2x | met |" in text  # error within 2x of PyTorch's own
    assert "| 1.50x | 1.20x |" in text  # dinov2_fast's row: over hf-sdpa, over hf-compile
    assert "not measured" in text  # giant was not run
    assert "80%" in text  # 800 of 1000 GB/s
    assert "RuntimeError: boom" in text
    if importlib.util.find_spec("matplotlib"):
        assert {p.name for p in written[1:]} == {
            "synthetic-2000-01-01-throughput.png",
            "synthetic-2000-01-01-kernels.png",
        }
    summary = report.summary(results.path)
    assert "6 rows measured, 1 skipped, 1 failed" in summary


def test_results_file_fills_nulls_replaces_rows_and_keeps_the_card(tmp_path):
    path = tmp_path / "r.json"
    results = _synthetic_results(path)
    results.add("model", **_model_row("hf-sdpa", 20.0, 1000.0))
    reopened = harness.ResultsFile(path, SYNTHETIC_ENV)
    sdpa = [r for r in reopened.data["rows"] if r.get("provider") == "hf-sdpa"]
    assert [r["latency_ms"] for r in sdpa] == [20.0]
    assert sdpa[0]["mfu"] is None and sdpa[0]["error"] is None
    assert reopened.peaks == {"copy_gbps": 1000.0, "bf16_tflops": 500.0}
    with pytest.raises(ValueError, match="unknown model row fields"):
        reopened.add("model", gbps=1.0)
    with pytest.raises(ValueError, match="holds results of"):
        harness.ResultsFile(path, {**SYNTHETIC_ENV, "gpu": "another card"})


def test_newest_results_goes_by_date(tmp_path):
    for name, date in (("b.json", "2000-01-02T00:00:00Z"), ("a.json", "2000-01-03T00:00:00Z")):
        (tmp_path / name).write_text(json.dumps({"date": date, "rows": []}))
    assert report.newest_results(tmp_path).name == "a.json"


def test_measure_rotates_inputs_and_takes_every_timed_call():
    seen = []
    timing = harness.measure(
        seen.append, ["a", "b", "c"], torch.device("cpu"), harness.Schedule(1, 2, 3)
    )
    assert len(timing.samples_ms) == 6 and timing.median_ms >= 0
    assert seen == ["a", "a", "b", "c", "a", "b", "c"]


@pytest.mark.parametrize("size", ["large", "giant"])
def test_model_flops_counts_every_matmul_and_attention(size):
    config = dinov2_fast.Dinov2Config.for_size(size)
    with torch.device("meta"):
        model = dinov2_fast.Dinov2Model(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    conv = model.embeddings.patch_embeddings.projection.weight.numel()
    patches, tokens = 16 * 16, 16 * 16 + 1
    attention = 4 * config.num_hidden_layers * tokens**2 * config.hidden_size
    expected = 2 * tokens * linear + 2 * patches * conv + attention
    assert model_flops(config, 224, 224) == pytest.approx(expected)


def test_case_matrices_have_unique_ids_and_known_providers():
    for matrix in MATRICES:
        models, kernels = model_cases(matrix), kernel_cases(matrix)
        assert len({c.id for c in models}) == len(models)
        assert len({c.id for c in kernels}) == len(kernels)
        assert {c.provider for c in models} <= set(MODEL_PROVIDERS)


@pytest.mark.interpreter
@torch.no_grad()
def test_provider_weights_are_its_own_so_packing_frees_the_originals():
    """peak_mem_mb must not count q/k/v twice: after dinov2_fast packs them on its first
    fused forward, nothing of the bench keeps the original storages alive."""
    setting = Setting(TINY, 56, 56, 1, torch.bfloat16)
    bench = Workbench(torch.device("cpu"))
    weights = bench.weights(setting)
    again = bench.weights(setting)
    query = "encoder.layer.0.attention.attention.query.weight"
    assert weights[query].data_ptr() != again[query].data_ptr()  # a copy per provider
    assert weights[query].dtype == torch.bfloat16
    del again
    originals = [
        weakref.ref(weights[f"encoder.layer.0.attention.attention.{name}.weight"])
        for name in ("query", "key", "value")
    ]
    forward = build("dinov2_fast", setting.spec.config(), weights)
    del weights
    inputs, _ = bench.batches(setting)
    forward(inputs[0])
    gc.collect()
    assert all(ref() is None for ref in originals)
    bench.clear()


def test_peak_memory_is_none_without_a_gpu():
    with harness.peak_memory(torch.device("cpu"), cuda_graphs=True) as memory:
        memory.steady_state()
    assert memory.allocated_mb is None
    idle = harness.graph_pool_idle_bytes(torch.device("cpu"))
    assert idle is None or isinstance(idle, int)
