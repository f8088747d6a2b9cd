"""What every suite shares: the timing helper, the card's measured peaks and the results file."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

RESULTS_DIR = Path(__file__).parent / "results"

# Every row carries all keys of its suite; what was not measured stays None (null).
ROW_FIELDS = {
    "model": (
        "suite",
        "model",
        "patch_size",
        "image_size",
        "batch",
        "dtype",
        "provider",
        "images_per_s",
        "latency_ms",
        "peak_mem_mb",
        "mfu",
        "max_rel_err",
        "compile_s",
        "error",
    ),
    "kernels": (
        "suite",
        "kernel",
        "shape",
        "model",
        "image_size",
        "batch",
        "dtype",
        "provider",
        "latency_ms",
        "gbps",
        "tflops",
        "max_rel_err",
        "error",
    ),
}
# A new row replaces an older one with the same identity, so a rerun of a stage updates it.
ROW_IDENTITY = ("suite", "model", "kernel", "shape", "image_size", "batch", "dtype", "provider")

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized_clock() -> float:
    """Host clock that first waits for queued GPU work: pytest-benchmark's timer in bench/,
    so its per-round times cover the GPU work issued in the round."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


@dataclass(frozen=True)
class Timing:
    """Per-call times in milliseconds."""

    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)


@dataclass(frozen=True)
class Schedule:
    """How ``measure`` calls: untimed warm-up calls, then rounds x iterations timed ones.

    ``lead_cycles`` > 0 puts a GPU spin of that many clock cycles before each timed call, so
    the device is still busy while the host launches the call and the events time the
    kernels alone: what a bandwidth figure needs when Python's launch takes longer than the
    kernel. Model forwards leave it at 0: their latency includes launching.
    """

    warmup: int
    rounds: int
    iterations: int
    lead_cycles: int = 0


# On the CPU the suites only prove that they run: one timed call under --benchmark-disable.
CPU_SCHEDULE = Schedule(warmup=0, rounds=2, iterations=1)


class RotatingCalls:
    """Each call runs ``fn`` on the next of ``inputs`` (rotating, so no input stays cached
    between calls) and records its time: CUDA events on a GPU, the host clock on a CPU.

    On a GPU the calls are queued with no synchronization between them: the events bracket
    each call's time on the device, which includes gaps only where the host's launches fall
    behind the GPU (see ``Schedule.lead_cycles``); ``timing()`` waits for them.
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        inputs: Sequence[Any],
        device: torch.device,
        lead_cycles: int = 0,
    ) -> None:
        if not inputs:
            raise ValueError("at least one input is needed")
        self._fn = fn
        self._inputs = inputs
        self._device = device
        self._lead_cycles = lead_cycles
        self._next = 0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._host_ms: list[float] = []

    def __call__(self) -> None:
        item = self._inputs[self._next]
        self._next = (self._next + 1) % len(self._inputs)
        if self._device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            if self._lead_cycles:
                torch.cuda._sleep(self._lead_cycles)
            start.record()
            self._fn(item)
            end.record()
            self._events.append((start, end))
        else:
            begin = time.perf_counter()
            self._fn(item)
            self._host_ms.append((time.perf_counter() - begin) * 1e3)

    def timing(self) -> Timing:
        synchronize(self._device)
        if self._device.type == "cuda":
            return Timing(tuple(start.elapsed_time(end) for start, end in self._events))
        return Timing(tuple(self._host_ms))


def measure(
    fn: Callable[[Any], Any],
    inputs: Sequence[Any],
    device: torch.device,
    schedule: Schedule,
    benchmark: Any = None,
) -> Timing:
    """Time ``fn`` over rotated ``inputs``: the schedule's warm-up calls untimed, then its
    rounds x iterations timed (take ``Timing.median_ms``).

    With pytest-benchmark's ``benchmark`` fixture the fixture drives the timed calls, so its
    table and our samples describe the same calls; ``--benchmark-disable`` makes that one
    call.
    """
    for i in range(schedule.warmup):
        fn(inputs[i % len(inputs)])
    synchronize(device)
    calls = RotatingCalls(fn, inputs, device, schedule.lead_cycles)
    if benchmark is None:
        for _ in range(schedule.rounds * schedule.iterations):
            calls()
    else:
        benchmark.pedantic(calls, rounds=schedule.rounds, iterations=schedule.iterations)
    return calls.timing()


def rotation_count(bytes_per_input: int, device: torch.device) -> int:
    """How many distinct inputs to rotate through so that together they overflow the GPU's
    L2 cache (50 MB on an H100) several times; 2 on a CPU."""
    if device.type != "cuda":
        return 2
    return max(2, min(16, -(-(256 << 20) // max(bytes_per_input, 1))))


def measure_peaks(device: torch.device) -> dict[str, float]:
    """The card's physical limits as measured now: device copy bandwidth (GB/s, bytes read
    plus written) and dense bf16 matmul throughput (TFLOP/s)."""
    on_gpu = device.type == "cuda"
    # 1 GiB per copy on a GPU, far past any cache; small on a CPU, where only the code path
    # matters.
    elements = (1 << 28) if on_gpu else (1 << 20)
    size = 8192 if on_gpu else 256
    source = torch.rand(elements, device=device)
    target = torch.empty_like(source)
    schedule = Schedule(warmup=3, rounds=5, iterations=4)
    copy = measure(target.copy_, [source], device, schedule)
    copied_bytes = 2 * source.numel() * source.element_size()
    left = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    right = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    matmul = measure(lambda a: torch.mm(a, right), [left], device, schedule)
    return {
        "copy_gbps": copied_bytes / (copy.median_ms * 1e-3) / 1e9,
        "bf16_tflops": 2 * size**3 / (matmul.median_ms * 1e-3) / 1e12,
    }


class PeakMemory:
    """What ``peak_memory`` measures: ``allocated_mb`` becomes, when the block ends, the peak
    of GPU memory allocated inside it above what was allocated when it began (None on a CPU,
    or where it could not be measured).

    ``steady_state()`` forgets the peak so far, so that one-time costs of a first call
    (compilation, autotuning, weight packing, graph capture) are not charged; what is still
    allocated then (weights, packed copies, compiled graphs' buffers) counts on, since it is
    above the baseline. With ``cuda_graphs`` the idle part of the CUDA graphs' private memory
    pools (their intermediates, which replays reuse without allocating) is added.
    """

    def __init__(self, device: torch.device, cuda_graphs: bool = False) -> None:
        self.device = device
        self.cuda_graphs = cuda_graphs
        self.allocated_mb: float | None = None
        self._baseline = 0
        self._graph_pools_before: int | None = 0

    def _start(self) -> None:
        synchronize(self.device)
        if self.cuda_graphs:
            self._graph_pools_before = graph_pool_idle_bytes(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._baseline = torch.cuda.memory_allocated(self.device)

    def steady_state(self) -> None:
        """Call after the first (warm-up, compiling, autotuning) call."""
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _stop(self) -> None:
        synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - self._baseline
        if self.cuda_graphs:
            after = graph_pool_idle_bytes(self.device)
            before = self._graph_pools_before
            if after is None or before is None or after <= before:
                return  # the graphs' pools could not be read: not measured, not guessed
            peak += after - before
        self.allocated_mb = peak / 2**20


def graph_pool_idle_bytes(device: torch.device) -> int | None:
    """Bytes that CUDA graphs' private memory pools hold but no tensor occupies (None when
    the allocator's snapshot does not say)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        index = torch.cuda.current_device() if device.index is None else device.index
        idle = 0
        for segment in torch.cuda.memory_snapshot():
            if segment.get("device", index) != index:
                continue
            if tuple(segment["segment_pool_id"]) != (0, 0):
                idle += segment["total_size"] - segment["allocated_size"]
        return idle
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, AssertionError):
        return None


@contextlib.contextmanager
def peak_memory(device: torch.device, cuda_graphs: bool = False) -> Iterator[PeakMemory]:
    """Measure the peak GPU memory allocated inside the block (see ``PeakMemory``)."""
    memory = PeakMemory(device, cuda_graphs)
    if device.type != "cuda":
        yield memory
        return
    memory._start()
    yield memory
    memory._stop()


def skip_with_row(results: ResultsFile, suite: str, row: dict[str, Any], reason: str) -> None:
    """Skip the case, leaving a row that says why (the report shows what could not run)."""
    results.add(suite, **row, error=f"skipped: {reason}")
    pytest.skip(reason)


@contextlib.contextmanager
def recording_failure(results: ResultsFile, suite: str, row: dict[str, Any]) -> Iterator[None]:
    """Leave a row with the error when the block raises: running out of GPU memory skips
    the case (a limit of the card, not a bug); anything else fails it."""
    try:
        yield
    except torch.OutOfMemoryError:
        skip_with_row(results, suite, row, "out of memory")
    except Exception as error:
        results.add(suite, **row, error=f"{type(error).__name__}: {error}"[:500])
        raise


def relative_error(out: Any, ref: Any, per_item: bool = False) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64; the worst of the items along dim 0 with
    ``per_item``, and the worst of the pairs when given tuples."""
    if isinstance(out, tuple):
        return max(relative_error(o, r, per_item) for o, r in zip(out, ref, strict=True))
    out, ref = out.detach().double(), ref.detach().double()
    if per_item:
        out, ref = out.flatten(1), ref.flatten(1)
        return ((out - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)).max().item()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """HEAD, with ``+dirty`` when the tree has changes; ``BENCH_COMMIT`` wins (a copied tree
    without .git, as on the lent GPU machines, cannot know its commit)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    root = Path(__file__).parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}+dirty" if dirty else head


def environment(device: torch.device) -> dict[str, Any]:
    """Who measured: the card (None on a CPU), the CPU, library versions, commit, UTC time."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": device.type,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "xformers": _version("xformers"),
        "commit": _git_commit(),
        "date": now.isoformat().replace("+00:00", "Z"),
    }


def slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_results_path(env: dict[str, Any]) -> Path:
    """``bench/results/<gpu-slug>-<date>.json`` (``cpu-<date>.json`` without a GPU)."""
    return RESULTS_DIR / f"{slug(env['gpu'] or 'cpu')}-{env['date'][:10]}.json"


class ResultsFile:
    """One run's results JSON. Rows are written as soon as they exist, so a stage stopped by
    its time budget keeps what it finished; several processes (the GPU check's stages) add to
    the same file one after another."""

    def __init__(self, path: Path, env: dict[str, Any]) -> None:
        self.path = Path(path)
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
            if self.data.get("gpu") != env["gpu"]:
                raise ValueError(
                    f"{self.path} holds results of {self.data.get('gpu')!r}, not {env['gpu']!r}"
                )
        else:
            self.data = {**env, "peaks": {"copy_gbps": None, "bf16_tflops": None}, "rows": []}

    @property
    def peaks(self) -> dict[str, float | None]:
        return self.data["peaks"]

    def set_peaks(self, peaks: dict[str, float]) -> None:
        self.data["peaks"] = dict(peaks)
        self.write()

    def add(self, suite: str, **fields: Any) -> dict[str, Any]:
        """Add one row (fields not given are null), replacing an earlier row with the same
        identity, and write the file."""
        unknown = set(fields) - set(ROW_FIELDS[suite])
        if unknown:
            raise ValueError(f"unknown {suite} row fields: {sorted(unknown)}")
        row = {key: fields.get(key) for key in ROW_FIELDS[suite]}
        row["suite"] = suite
        identity = [row.get(key) for key in ROW_IDENTITY]
        self.data["rows"] = [
            old for old in self.data["rows"] if [old.get(k) for k in ROW_IDENTITY] != identity
        ]
        self.data["rows"].append(row)
        self.write()
        return row

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.data, indent=1) + "\n")
        partial.replace(self.path)
