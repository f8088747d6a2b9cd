"""Mixed-aspect batches: one packed varlen forward against the two ways peers run them.

    python -m bench.mixed_resolution --out mixed.json               # on a GPU
    python -m bench.mixed_resolution --out mixed.json --cpu-smoke   # tiny shapes on the CPU

The set: images at their own aspect ratio (1:1, 4:3, 3:4, 16:9, 9:16) with the shortest edge
at 224 px, and the same at 518 px, sides floored to the patch. Three ways to embed a set:

- ``packed``: ``model(pixel_values=[...])``, every image's tokens in one stream, varlen
  attention, no padding (dinov2_fast only);
- ``padded``: every image zero-padded to the set's largest height and width, one batch (what
  a fixed-shape model must do; it also changes the features);
- ``per-size``: one batch per distinct size (exact, but many small launches).

Reported per way: tokens/s over the real (unpadded) tokens and peak memory. On the CPU
(``--cpu-smoke``, a two-block model under the Triton interpreter) it only proves the script
runs; its timings say nothing about a GPU.
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

ASPECTS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16))
SMOKE_FIELDS = {"hidden_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2}


def aspect_sizes(short_edge: int, patch: int) -> list[tuple[int, int]]:
    """(H, W) per aspect ratio, the shortest edge ``short_edge``, each side floored to
    ``patch``."""
    sizes = []
    for width, height in ASPECTS:
        scale = short_edge / min(width, height)
        h, w = round(height * scale), round(width * scale)
        sizes.append((h // patch * patch, w // patch * patch))
    return sizes


def _timer(device: torch.device, warmup: int, reps: int) -> Callable[[Callable[[], object]], float]:
    def measure(fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    return measure


def run_set(
    model: Any, images: list[torch.Tensor], device: torch.device, reps: int = 5
) -> dict[str, Any]:
    """Time the three ways on ``images``; returns tokens/s and peak memory per way."""
    patch = model.config.patch_size
    prefix = 1 + model.config.num_register_tokens
    tokens = sum(prefix + (i.shape[1] // patch) * (i.shape[2] // patch) for i in images)
    height = max(i.shape[1] for i in images)
    width = max(i.shape[2] for i in images)
    padded = torch.zeros(len(images), 3, height, width, device=device, dtype=images[0].dtype)
    for slot, image in zip(padded, images, strict=True):
        slot[:, : image.shape[1], : image.shape[2]] = image
    by_size: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for image in images:
        by_size.setdefault(tuple(image.shape), []).append(image)
    groups = [torch.stack(group) for group in by_size.values()]
    ways = {
        "packed": lambda: model(pixel_values=images),
        "padded": lambda: model(pixel_values=padded),
        "per-size": lambda: [model(pixel_values=group) for group in groups],
    }
    measure = _timer(device, warmup=min(reps, 2), reps=reps)
    rows = {}
    for way, forward in ways.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            seconds = measure(forward)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        rows[way] = {"tokens_per_s": tokens / seconds, "ms": seconds * 1e3, "peak_mib": peak}
    best_peer = max(rows["padded"]["tokens_per_s"], rows["per-size"]["tokens_per_s"])
    return {
        "images": len(images),
        "tokens": tokens,
        "padded_tokens": len(images) * (prefix + (height // patch) * (width // patch)),
        "ways": rows,
        "packed_vs_best_peer": rows["packed"]["tokens_per_s"] / best_peer,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="JSON file to (re)write")
    parser.add_argument("--model", default="base", help="released size (default base)")
    parser.add_argument("--copies", type=int, default=8, help="images per aspect ratio")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args(argv)
    import dinov2_fast
    from bench import harness
    from dinov2_fast._resolve import random_model

    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, dtype, short_edges, copies = torch.device("cpu"), torch.float32, (28,), 1
        config = dinov2_fast.Dinov2Config(**SMOKE_FIELDS)
        model = dinov2_fast.Dinov2Model(config).eval().set_backend("triton")
    elif torch.cuda.is_available():
        device, dtype, short_edges, copies = (
            torch.device("cuda"),
            torch.bfloat16,
            (224, 518),
            args.copies,
        )
        model = random_model(args.model).eval().to(device=device, dtype=dtype)
    else:
        print("mixed_resolution: no CUDA device (use --cpu-smoke for a dry run)", file=sys.stderr)
        return 2
    result = {**harness.environment(device), "model": args.model, "sets": []}
    for short_edge in short_edges:
        sizes = aspect_sizes(short_edge, model.config.patch_size) * copies
        images = [torch.randn(3, h, w, device=device, dtype=dtype) for h, w in sizes]
        reps = 1 if args.cpu_smoke else 5
        row = {"short_edge": short_edge, **run_set(model, images, device, reps)}
        result["sets"].append(row)
        args.out.write_text(json.dumps(result, indent=1))
        print(
            f"short edge {short_edge}: {row['images']} images, {row['tokens']} tokens "
            f"({row['padded_tokens']} padded); packed {row['packed_vs_best_peer']:.2f}x the "
            "better of padded and per-size"
        )
        for way, numbers in row["ways"].items():
            peak = "" if numbers["peak_mib"] is None else f", peak {numbers['peak_mib']:.0f} MiB"
            print(f"  {way:9s} {numbers['tokens_per_s']:12.0f} tokens/s{peak}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
