"""Host cost of one forward, on the CPU: Python and dispatch, with the kernels' work removed.

    python -m bench.host_overhead [--layers 12] [--repeats 7] [--iters 200]

Runs a 12-block DINOv2 so small (width 64, 2 tokens, batch 1) that its arithmetic is
negligible, and replaces the Triton interpreter's launch (``InterpretedFunction.run``) with a
counter, so a Triton launch costs what the GPU path's Python costs up to the launch itself.
What is left is host time: the figure that decides batch-1 latency when no CUDA graph hides
it (DESIGN.md §3). Reported against transformers' own eager forward of the same config in the
same process; the goal of issue 9 is a fused-path ratio of at most 0.5.

CPU only, and no claim about any GPU: cuBLAS launches and Triton's C launcher are not in it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator

# The stubbed launch is the interpreter's: choose it before any kernel is defined.
os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

TINY_FIELDS = {
    "hidden_size": 64,
    "num_attention_heads": 2,
    "intermediate_size": 256,
    "image_size": 14,
    "patch_size": 14,
}


@contextlib.contextmanager
def stubbed_launches() -> Iterator[list[int]]:
    """Replace every interpreted kernel launch with a counter; yields [launches]."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = [0]
    original = InterpretedFunction.run

    def count(self, *args, **kwargs):
        launches[0] += 1

    InterpretedFunction.run = count
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


def median_us(
    forwards: dict[str, Callable[[], object]], iters: int, repeats: int
) -> dict[str, float]:
    """Per forward, the median over ``repeats`` rounds of the mean time of ``iters`` calls,
    in microseconds of this thread's CPU time (time spent descheduled on a loaded machine is
    not host cost). Rounds interleave the forwards, so cache effects hit all alike."""
    for forward in forwards.values():
        for _ in range(max(iters // 10, 3)):
            forward()
    samples: dict[str, list[float]] = {name: [] for name in forwards}
    for _ in range(repeats):
        for name, forward in forwards.items():
            start = time.thread_time()
            for _ in range(iters):
                forward()
            samples[name].append((time.thread_time() - start) / iters * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def build(layers: int) -> dict[str, Callable[[], object]]:
    """The forwards to time, one set of random weights (our model and transformers')."""
    import transformers

    import dinov2_fast

    torch.manual_seed(0)
    fields = {**TINY_FIELDS, "num_hidden_layers": layers}
    theirs = transformers.Dinov2Model(transformers.Dinov2Config(**fields)).eval()
    eager = transformers.Dinov2Model._from_config(
        transformers.Dinov2Config(**fields), attn_implementation="eager"
    ).eval()
    eager.load_state_dict(theirs.state_dict())
    ours = dinov2_fast.Dinov2Model(dinov2_fast.Dinov2Config(**fields)).eval()
    ours.load_state_dict(theirs.state_dict())
    fused = dinov2_fast.Dinov2Model(dinov2_fast.Dinov2Config(**fields)).eval()
    fused.load_state_dict(theirs.state_dict())
    fused.set_backend("triton")
    pixels = torch.randn(1, 3, 14, 14)

    def run(model: torch.nn.Module) -> Callable[[], object]:
        def forward() -> object:
            with torch.inference_mode():
                return model(pixels)

        return forward

    return {
        "transformers eager": run(eager),
        "transformers sdpa": run(theirs),
        "dinov2_fast torch path": run(ours.set_backend("torch")),
        "dinov2_fast fused (launches stubbed)": run(fused),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # Stubbed launches leave their outputs unwritten, and that garbage is often denormal
    # floats, on which a CPU GEMM runs 10x slower: an artifact no GPU run has.
    torch.set_flush_denormal(True)
    forwards = build(args.layers)
    with stubbed_launches() as launches:
        forwards["dinov2_fast fused (launches stubbed)"]()
        per_forward = launches[0]
        times = median_us(forwards, args.iters, args.repeats)
    baseline = times["transformers eager"]
    print(
        f"host cost per forward, {args.layers} blocks, width 64, batch 1, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread"
    )
    print(f"fused path: {per_forward} Triton launches per forward (stubbed)")
    for name, us in times.items():
        print(f"{name:40s} {us:9.1f} us  {us / baseline:5.2f}x transformers eager")
    return 0


if __name__ == "__main__":
    sys.exit(main())
