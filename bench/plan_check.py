"""The plan question on a GPU: every plan candidate and every peer, side by side, per shape.

    python -m bench.plan_check --out plans.json            # on a GPU (the GPU check's stage)
    python -m bench.plan_check --out plans.json --cpu-smoke  # tiny shapes on the CPU

For each headline shape (dinov2-large 224 px batch 64, giant 518 px batch 8, base 224 px
batch 1, bf16) it tunes the plan afresh (``dinov2_fast.tune(..., retune=True)``: every
candidate of every site timed on the first block, the numerics rule applied) and then times
whole forwards: our model on the tuned, the unfused and the all-kernel plan, base batch 1
also replayed from a CUDA graph, against transformers with SDPA, eager attention and
``torch.compile`` (large only: the compile is the slow step). On a GPU the model runs on
``backend="auto"``, so "tuned" is the plan a user gets. Median of CUDA-event timings.
The JSON (rewritten after every shape, so a run stopped by its budget keeps what it
finished) records which plan won and why, with every candidate's time.

``--cpu-smoke`` runs the same code on a two-block model under the Triton interpreter with a
host clock: it proves the script runs (the suite does this), and says nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Cheapest first, so a run cut short by its budget keeps the most shapes.
SHAPES = (("base", 224, 1), ("large", 224, 64), ("giant", 518, 8))
SMOKE_SHAPES = (("smoke", 28, 2),)
SMOKE_FIELDS = {"hidden_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2}


def _host_timer(label: str, fn: Callable[[], object], warmup: int = 1, reps: int = 2) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _model(size: str, image_size: int, device: torch.device, dtype: torch.dtype) -> Any:
    import dinov2_fast
    from dinov2_fast._resolve import random_model

    if size == "smoke":
        config = dinov2_fast.Dinov2Config(image_size=image_size, **SMOKE_FIELDS)
        return dinov2_fast.Dinov2Model(config).eval().to(device=device, dtype=dtype)
    return random_model(size).eval().to(device=device, dtype=dtype)


def _transformers(model: Any, attention: str, device: torch.device, dtype: torch.dtype) -> Any:
    import transformers

    fields = model.config.to_dict()
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    # Built on the device in its dtype: a giant twin on the CPU in fp32 costs most of a budget.
    with torch.device(device):
        twin = transformers.AutoModel.from_config(
            config, attn_implementation=attention, torch_dtype=dtype
        )
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def _forward(net: Callable[..., Any], pixels: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return net(pixel_values=pixels)

    return run


def check_shape(
    size: str,
    image_size: int,
    batch: int,
    device: torch.device,
    smoke: bool,
    row: dict[str, Any],
    save: Callable[[], None],
) -> None:
    """Tune one shape and time every way to run it into ``row``, saving after each step."""
    import dinov2_fast
    from dinov2_fast import plan

    dtype = torch.float32 if smoke else torch.bfloat16
    timer = _host_timer if smoke else plan.cuda_timer
    model = _model(size, image_size, device, dtype)
    if smoke:
        model.set_backend("triton")
    pixels = torch.randn(batch, 3, image_size, image_size, device=device, dtype=dtype)
    started = time.perf_counter()
    record = dinov2_fast.tune(model, pixels, timer=timer if smoke else None, retune=True)
    row.update({
        "dtype": str(dtype).removeprefix("torch."),
        "plan": str(record.plan),
        "reason": record.reason,
        "tune_s": round(time.perf_counter() - started, 2),
        "candidates_ms": dict(record.times_ms),
        "rejected": dict(record.rejected),
    })  # fmt: skip
    save()
    forwards: dict[str, Callable[[], object]] = {}
    for name, forced in (("tuned", None), ("unfused", "unfused"), ("fused", "fused")):
        forwards[f"dinov2_fast {name} plan"] = (forced, _forward(model, pixels))
    if device.type == "cuda" and batch == 1:
        graphed = dinov2_fast.cuda_graph(model)
        forwards["dinov2_fast tuned plan + cudagraph"] = (None, lambda: graphed(pixels))
    for attention in ("sdpa", "eager"):
        forwards[f"transformers {attention}"] = (None, attention)
    if size == "large":  # the compile is the slow step: last
        forwards["transformers sdpa + torch.compile"] = (None, "compile")
    for label, (forced, forward) in forwards.items():
        if label.startswith("dinov2_fast"):
            model.set_plan(forced)
        try:
            if isinstance(forward, str):
                twin = _transformers(model, "sdpa" if forward == "compile" else forward, device,
                                     dtype)  # fmt: skip
                forward = _forward(torch.compile(twin) if forward == "compile" else twin, pixels)
            row["forward_ms"][label] = timer(label, forward)
        except Exception as error:  # noqa: BLE001 - one provider failing is a row, not a stop
            row["errors"][label] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
        save()
    model.set_plan(None)
    tuned = row["forward_ms"].get("dinov2_fast tuned plan")
    if tuned:
        row["speedup_of_tuned"] = {
            label: round(ms / tuned, 3) for label, ms in row["forward_ms"].items()
        }
    save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="JSON file to (re)write")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, shapes = torch.device("cpu"), SMOKE_SHAPES
    elif torch.cuda.is_available():
        device, shapes = torch.device("cuda"), SHAPES
    else:
        print("plan_check: no CUDA device (use --cpu-smoke for a dry run)", file=sys.stderr)
        return 2
    from bench import harness

    result = {**harness.environment(device), "shapes": []}

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=1))

    for size, image_size, batch in shapes:
        row: dict[str, Any] = {
            "model": size,
            "image_size": image_size,
            "batch": batch,
            "forward_ms": {},
            "errors": {},
        }
        result["shapes"].append(row)
        try:
            check_shape(size, image_size, batch, device, args.cpu_smoke, row, save)
        except Exception as error:  # noqa: BLE001 - a shape that fails is a row; the next runs
            row["errors"]["shape"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            save()
            print(f"{size}@{image_size} b{batch}: {row['errors']['shape']}")
            continue
        print(f"{size}@{image_size} b{batch}: plan {row['plan']} ({row['reason']})")
        tuned = row["forward_ms"].get("dinov2_fast tuned plan")
        for label, ms in sorted(row["forward_ms"].items(), key=lambda item: item[1]):
            ratio = f"{ms / tuned:5.2f}x the tuned plan" if tuned else ""
            print(f"  {label:40s} {ms:9.3f} ms  {ratio}")
        for label, error in row["errors"].items():
            print(f"  {label:40s} {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
