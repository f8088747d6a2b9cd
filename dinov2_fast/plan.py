"""Which implementation each fusion site of the fused forward runs: a plan per shape.

A block has three sites (DESIGN.md §3):

- ``attention``: the flash kernel (``triton``: autotuned; ``triton:<config>``: one config of
  ``kernels.attention.candidate_configs``) or PyTorch's SDPA (``sdpa``: its own dispatch, as
  transformers runs it; ``sdpa:flash|efficient|cudnn``: one backend forced);
- ``ffn``: for an exact-GELU MLP, fc1 + the GELU kernel (``triton``), fc1 with GELU in the
  cuBLASLt epilogue (``epilogue``, tanh form: a candidate only where it passes the numerics
  rule) or fc1 + ``F.gelu`` (``torch``); for SwiGLU the SwiGLU kernel or PyTorch;
- ``norm``: residual + LayerScale + LayerNorm in one kernel (``triton``) or in PyTorch.

The unfused plan (``sdpa`` / ``torch`` / ``torch``) computes what transformers computes and is
always a candidate. On first use of a (GPU, dtype, model, token bucket, batch bucket) on CUDA,
``choose`` times every candidate of every site on the first block's real inputs (CUDA events,
warm-up, median of several), drops those that fail the numerics rule (error against an fp32
reference at most twice the unfused site's own, DESIGN.md §4), keeps the fastest per site,
then times the whole block under that plan against the unfused block and keeps the faster.
Choices are cached in memory and on disk (``plans.json`` under ``DINOV2_FAST_CACHE_DIR``,
default ``~/.cache/dinov2_fast``), the file stamped with the versions of this library, torch,
triton and the CUDA driver: a stamp that differs discards the file. Tuning never runs in a
CUDA-graph capture or a compile trace (a capture uses the cached plan, else every site on
its kernel; a trace runs every site on its kernel, sites forced by ``set_plan`` or
``DINOV2_FAST_PLAN`` excepted).

``DINOV2_FAST_PLAN`` (or ``model.set_plan``) forces a plan: ``unfused``, ``fused`` or
``site=candidate`` pairs, e.g. ``attention=sdpa:flash,ffn=triton``; sites left out are chosen
as usual.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["PLAN_ENV_VAR", "Plan", "PlanRecord", "cache_path", "cached_plans", "parse_plan"]

PLAN_ENV_VAR = "DINOV2_FAST_PLAN"
CACHE_ENV_VAR = "DINOV2_FAST_CACHE_DIR"
SITES = ("attention", "ffn", "norm")
_SDPA_BACKENDS = ("flash", "efficient", "cudnn")
_log = logging.getLogger("dinov2_fast")


@dataclasses.dataclass(frozen=True)
class Plan:
    """One implementation name per site (see the module docstring)."""

    attention: str
    ffn: str
    norm: str

    def __str__(self) -> str:
        return ",".join(f"{site}={getattr(self, site)}" for site in SITES)

    def replace(self, **sites: str) -> Plan:
        return dataclasses.replace(self, **sites)


UNFUSED = Plan(attention="sdpa", ffn="torch", norm="torch")
FUSED = Plan(attention="triton", ffn="triton", norm="triton")
_PRESETS = {"unfused": UNFUSED, "fused": FUSED}


@dataclasses.dataclass(frozen=True)
class PlanRecord:
    """A plan and why it is in force: ``reason`` in words, the timed candidates in ms."""

    plan: Plan
    reason: str
    times_ms: Mapping[str, float] = dataclasses.field(default_factory=dict)
    rejected: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "plan": dataclasses.asdict(self.plan),
            "reason": self.reason,
            "times_ms": dict(self.times_ms),
            "rejected": dict(self.rejected),
        }

    @classmethod
    def from_json(cls, value: Any) -> PlanRecord:
        return cls(
            Plan(**value["plan"]),
            str(value["reason"]),
            {str(k): float(v) for k, v in value.get("times_ms", {}).items()},
            {str(k): str(v) for k, v in value.get("rejected", {}).items()},
        )


def _valid_candidate(site: str, name: str) -> bool:
    if site == "attention":
        kind, _, detail = name.partition(":")
        if kind == "sdpa":
            return detail in ("", *_SDPA_BACKENDS)
        if kind == "triton":
            if not detail:
                return True
            try:
                from .kernels.attention import AttentionConfig

                AttentionConfig.from_name(detail)
            except (ImportError, ValueError):
                return False
            return True
        return False
    if site == "ffn":
        return name in ("torch", "triton", "epilogue")
    return name in ("torch", "triton")


def parse_plan(text: str | Mapping[str, str]) -> dict[str, str]:
    """The sites a forced plan names: ``"unfused"``, ``"fused"``, ``"site=name,..."`` or a
    mapping; raises ValueError naming what is accepted."""
    if isinstance(text, Mapping):
        pairs = dict(text)
    elif text.strip() in _PRESETS:
        return dataclasses.asdict(_PRESETS[text.strip()])
    else:
        pairs = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            site, sep, name = item.partition("=")
            if not sep:
                raise ValueError(
                    f"plan item {item!r} is not site=candidate; use 'unfused', 'fused' or e.g. "
                    "'attention=sdpa:flash,ffn=triton,norm=torch'"
                )
            pairs[site.strip()] = name.strip()
    for site, name in pairs.items():
        if site not in SITES:
            raise ValueError(f"plan site {site!r} unknown; sites: {', '.join(SITES)}")
        if not _valid_candidate(site, name):
            accepted = {
                "attention": "triton, triton:<config>, sdpa, sdpa:flash|efficient|cudnn",
                "ffn": "triton, epilogue, torch",
                "norm": "triton, torch",
            }[site]
            raise ValueError(f"plan {site}={name!r} unknown; accepted: {accepted}")
    return pairs


# -- keys and the caches ----------------------------------------------------------------


def _bucket_tokens(tokens: int) -> int:
    """Token counts up to a multiple of 16: kernels' tiles see the same work within one."""
    return -(-tokens // 16) * 16


def _bucket_batch(batch: int) -> int:
    """Batches up to a power of two (capped at 256): launch shape, not arithmetic, changes."""
    return min(1 << max(batch - 1, 0).bit_length(), 256)


def device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"


def plan_key(device: torch.device, dtype: torch.dtype, model: str, batch: int, tokens: int) -> str:
    """The cache key: GPU, dtype, model shape, batch bucket and token bucket."""
    return (
        f"{device_name(device)}|{str(dtype).removeprefix('torch.')}|{model}"
        f"|B{_bucket_batch(batch)}|N{_bucket_tokens(tokens)}"
    )


def cache_path() -> Path:
    """Where tuned plans are kept (``DINOV2_FAST_CACHE_DIR``, default ~/.cache/dinov2_fast)."""
    folder = os.environ.get(CACHE_ENV_VAR)
    if folder is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "dinov2_fast")
    return Path(folder) / "plans.json"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """What a cached plan depends on besides its key: a change invalidates every plan."""
    from . import __version__

    driver = None
    get_driver = getattr(torch._C, "_cuda_getDriverVersion", None)
    if get_driver is not None and torch.cuda.is_available():
        try:
            driver = str(get_driver())
        except RuntimeError:
            driver = None
    return {
        "dinov2_fast": __version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "driver": driver,
    }


class _Store:
    """In-memory plans backed by the JSON file; the file is read once per process."""

    def __init__(self) -> None:
        self.records: dict[str, PlanRecord] = {}
        self.loaded_from: Path | None = None

    def _load(self) -> None:
        path = cache_path()
        if self.loaded_from == path:
            return
        self.loaded_from = path
        self.records = {}
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            _log.warning("dinov2_fast: ignoring the unreadable plan cache %s (%s)", path, e)
            return
        if not isinstance(data, dict) or data.get("versions") != versions():
            _log.info("dinov2_fast: plan cache %s was tuned with other versions; discarded", path)
            return
        try:
            self.records = {k: PlanRecord.from_json(v) for k, v in data["plans"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            _log.warning("dinov2_fast: ignoring the malformed plan cache %s (%s)", path, e)

    def get(self, key: str) -> PlanRecord | None:
        self._load()
        return self.records.get(key)

    def put(self, key: str, record: PlanRecord) -> None:
        self._load()
        self.records[key] = record
        path = cache_path()
        # Plans another process saved since this one read the file are kept, not overwritten.
        self.loaded_from = None
        saved, self.records = self.records, {}
        self._load()
        self.records.update(saved)
        payload = {
            "versions": versions(),
            "plans": {k: v.to_json() for k, v in sorted(self.records.items())},
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write-then-rename: a reader never sees half a file, even with two processes.
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as tmp:
                json.dump(payload, tmp, indent=1)
            os.replace(tmp.name, path)
        except OSError as e:
            _log.warning("dinov2_fast: could not save the plan cache %s (%s)", path, e)

    def all(self) -> dict[str, PlanRecord]:
        self._load()
        return dict(self.records)


_STORE = _Store()


def cached_plans() -> dict[str, PlanRecord]:
    """Every plan tuned on this machine with the current versions (key -> record)."""
    return _STORE.all()


def lookup(key: str) -> PlanRecord | None:
    """The cached plan for ``key`` (memory, then disk), or None."""
    return _STORE.get(key)


def remember(key: str, record: PlanRecord) -> None:
    """Cache ``record`` for ``key`` in memory and on disk."""
    _STORE.put(key, record)


def forced_sites(model_forced: str | Mapping[str, str] | None) -> dict[str, str]:
    """Sites forced by ``model.set_plan`` (first) or ``DINOV2_FAST_PLAN``."""
    if model_forced is not None:
        return parse_plan(model_forced)
    text = os.environ.get(PLAN_ENV_VAR)
    if not text:
        return {}
    try:
        return parse_plan(text)
    except ValueError as e:
        raise ValueError(f"{PLAN_ENV_VAR}={text!r}: {e}") from None


# -- timing and numerics ----------------------------------------------------------------

Timer = Callable[[str, Callable[[], object]], float]


def cuda_timer(label: str, fn: Callable[[], object], warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream (CUDA events per call)."""
    for _ in range(warmup):
        fn()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(reps)
    ]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = out.detach().double() - ref.detach().double()
    return diff.abs().max().item(), diff.pow(2).mean().sqrt().item()


def numerics_failure(out: Any, unfused_out: Any, reference: Any, atol: float = 1e-5) -> str | None:
    """Why ``out`` fails the rule of DESIGN.md §4 against the fp32 ``reference`` (None if it
    passes): worst and rms error at most twice those of the unfused site, plus ``atol``
    scaled by the reference's magnitude. Tuples compare element by element."""
    if isinstance(out, tuple):
        for o, u, r in zip(out, unfused_out, reference, strict=True):
            failure = numerics_failure(o, u, r, atol)
            if failure is not None:
                return failure
        return None
    if out.shape != reference.shape:
        return f"shape {tuple(out.shape)}, expected {tuple(reference.shape)}"
    if not torch.isfinite(out).all():
        return "non-finite values"
    slack = atol * max(1.0, reference.detach().abs().max().item())
    out_max, out_rms = _errors(out, reference)
    base_max, base_rms = _errors(unfused_out, reference)
    if out_max > 2 * base_max + slack or out_rms > 2 * base_rms + slack:
        return (
            f"error max {out_max:.2e} / rms {out_rms:.2e} > 2x the unfused "
            f"{base_max:.2e} / {base_rms:.2e}"
        )
    return None


@dataclasses.dataclass
class Site:
    """One fusion site to tune: its candidates as zero-argument callables on real inputs,
    the unfused candidate's name, and a zero-argument fp32 reference."""

    name: str
    candidates: dict[str, Callable[[], Any]]
    unfused: str
    reference: Callable[[], Any]


def choose(
    sites: list[Site], block: Callable[[Plan], Callable[[], object]], timer: Timer
) -> PlanRecord:
    """Time every candidate of every site, keep the fastest that passes the numerics rule,
    then keep that plan only if its whole block is not slower than the unfused block."""
    started = time.perf_counter()
    chosen: dict[str, str] = {}
    times: dict[str, float] = {}
    rejected: dict[str, str] = {}
    for site in sites:
        reference = site.reference()
        unfused_out = site.candidates[site.unfused]()
        best, best_ms = site.unfused, math.inf
        for name, run in site.candidates.items():
            label = f"{site.name}={name}"
            try:
                failure = numerics_failure(run(), unfused_out, reference)
            except Exception as e:  # noqa: BLE001 - a candidate that cannot run is not chosen
                failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if failure is not None and name != site.unfused:
                rejected[label] = failure
                continue
            times[label] = ms = timer(label, run)
            if ms < best_ms:
                best, best_ms = name, ms
        chosen[site.name] = best
    plan = Plan(**{**dataclasses.asdict(UNFUSED), **chosen})
    reason = "fastest passing candidate per site"
    if plan != UNFUSED:
        fused_ms = times["block=chosen"] = timer("block=chosen", block(plan))
        unfused_ms = times["block=unfused"] = timer("block=unfused", block(UNFUSED))
        if fused_ms > unfused_ms:
            plan, reason = UNFUSED, "the chosen sites made the whole block slower than unfused"
    elapsed = time.perf_counter() - started
    reason = f"{reason}, tuned in {elapsed:.1f} s"
    return PlanRecord(plan, reason, times, rejected)


def log_tuned(key: str, record: PlanRecord) -> None:
    """Say which plan a first use chose and how long tuning took (logger ``dinov2_fast``)."""
    _log.info("dinov2_fast: tuned %s -> %s (%s)", key, record.plan, record.reason)
