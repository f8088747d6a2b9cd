"""The GPU check's plan stage runs end to end on the CPU (tiny shapes, interpreter), so it
cannot rot between GPU leases. Its timings here mean nothing."""

import json

import pytest

from bench import plan_check

pytest.importorskip("triton")


def test_plan_check_writes_every_row_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOV2_FAST_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "plans.json"
    assert plan_check.main(["--out", str(out), "--cpu-smoke"]) == 0
    [row] = json.loads(out.read_text())["shapes"]
    assert row["plan"].startswith("attention=")
    assert {"attention=sdpa", "norm=triton", "ffn=triton"} <= set(row["candidates_ms"])
    assert {"dinov2_fast tuned plan", "dinov2_fast unfused plan", "transformers eager"} <= set(
        row["forward_ms"]
    )
    assert not row["errors"]


def test_mixed_resolution_runs_on_the_cpu(tmp_path):
    from bench import mixed_resolution

    out = tmp_path / "mixed.json"
    assert mixed_resolution.main(["--out", str(out), "--cpu-smoke"]) == 0
    [row] = json.loads(out.read_text())["sets"]
    assert set(row["ways"]) == {"packed", "padded", "per-size"}
    assert row["padded_tokens"] > row["tokens"]
    assert mixed_resolution.aspect_sizes(224, 14)[:2] == [(224, 224), (224, 294)]
