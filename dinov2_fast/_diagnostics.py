"""The ``info``, ``verify``, ``bench`` and ``tune`` commands."""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from . import __version__, fused, plan
from ._resolve import (
    UserError,
    check_backend,
    check_image_size,
    dtype_name,
    load_model,
    resolve_device,
    resolve_dtype,
)
from .kernels._common import count_launches, interpreting
from .ops import BACKEND_ENV_VAR, triton_available
from .outputs import BaseModelOutputWithPooling

# verify multiplies every parameter of the fast-path copy by (1 + x * noise) when this is set
# to x: a planted mismatch, so tests can prove that verify fails when the numbers are wrong.
PLANT_ENV = "DINOV2_FAST_VERIFY_PLANT"

# Relative-error floor per dtype on top of twice PyTorch's own error in that dtype
# (DESIGN.md §4). float32 leaves room for TF32 tensor-core dots in the kernels.
_ERROR_FLOOR = {torch.float32: 1e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns; the first row is the header when there is one."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _triton_status(device: torch.device) -> tuple[bool, str]:
    if _version("triton") == "not installed":
        return False, "triton is not installed (pip install 'dinov2-fast[triton]')"
    if interpreting():
        return True, "TRITON_INTERPRET=1: kernels run in the CPU interpreter (slow: for tests)"
    if not triton_available(device):
        return False, "no CUDA device (TRITON_INTERPRET=1 runs the kernels in the slow interpreter)"
    return True, f"on {torch.cuda.get_device_name(device)}"


def info() -> int:
    """Print versions, the device and which backends can run, and why not."""
    device = resolve_device("auto")
    rows = [
        ["dinov2-fast", __version__],
        ["python", platform.python_version()],
        ["torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"],
        *[[name, _version(name)] for name in ("triton", "transformers", "numpy", "pillow")],
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = (
            f"{device} {props.name}, sm_{props.major}{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB ({torch.cuda.device_count()} visible)"
        )
    else:
        where = f"cpu ({torch.get_num_threads()} threads), no CUDA device"
    rows.append(["device", where])
    forced = os.environ.get(BACKEND_ENV_VAR)
    if forced:
        rows.append([BACKEND_ENV_VAR, f"{forced} (overrides --backend)"])
    usable, why = _triton_status(device)
    rows += [
        ["backend torch", "usable: the plain PyTorch reference"],
        ["backend triton", f"{'usable' if usable else 'not usable'}: {why}"],
        ["backend auto", "triton" if usable and device.type == "cuda" else "torch"],
    ]
    forced_plan = os.environ.get(plan.PLAN_ENV_VAR)
    if forced_plan:
        rows.append([plan.PLAN_ENV_VAR, f"{forced_plan} (forces these sites of every plan)"])
    plans = plan.cached_plans()
    rows.append(["plan cache", f"{plan.cache_path()} ({len(plans)} tuned shapes)"])
    print(_table(rows))
    if plans:
        print("\ntuned plans (GPU | dtype | model | batch bucket | token bucket):")
        print(_table([[key, str(record.plan), record.reason] for key, record in plans.items()]))
    return 0


def _plan_line(model: torch.nn.Module, pixels: torch.Tensor) -> str:
    record = fused.plan_in_force(model, pixels)
    if record is None:
        return "plan: none (the PyTorch path runs)"
    return f"plan: {record.plan} ({record.reason})"


def tune(
    model: str,
    *,
    batches: Sequence[int],
    image_size: int,
    dtype: str,
    device: str,
    backend: str,
    retune: bool,
) -> int:
    """Tune and cache the fused path's plan for each batch size ahead of serving."""
    torch_device = resolve_device(device)
    if torch_device.type != "cuda":
        raise UserError(f"tune times the candidates on a CUDA device; {torch_device} is not one")
    if backend == "torch":
        raise UserError("--backend torch runs no fused path, so it has no plan to tune")
    torch_dtype = resolve_dtype(dtype, torch_device)
    ours = load_model(
        model, dtype=torch_dtype, device=torch_device, backend="auto", allow_random_size=True
    )
    check_image_size(image_size, ours.config.patch_size, "--image-size")
    for batch in batches:
        pixels = torch.randn(
            batch, 3, image_size, image_size, device=torch_device, dtype=torch_dtype
        )
        record = fused.tune(ours, pixels, retune=retune)
        print(f"batch {batch}: {record.plan} ({record.reason})")
        timed = sorted(record.times_ms.items(), key=lambda item: item[1])
        print("  " + ", ".join(f"{label} {ms:.3f} ms" for label, ms in timed))
        for label, why in record.rejected.items():
            print(f"  rejected {label}: {why}")
    print(f"saved to {plan.cache_path()}")
    return 0


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double().cpu()
    return ((out.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _named_outputs(output: BaseModelOutputWithPooling) -> dict[str, torch.Tensor]:
    # hidden_states is (embeddings, layer 1, ..., layer L), as in transformers.
    hidden = output.hidden_states or ()
    named = {"embeddings" if i == 0 else f"layer {i}": state for i, state in enumerate(hidden)}
    named["last_hidden_state"] = output.last_hidden_state
    named["pooler_output"] = output.pooler_output
    return named


def _errors(
    model: torch.nn.Module, pixels: torch.Tensor, reference: dict[str, torch.Tensor]
) -> dict[str, float]:
    with torch.inference_mode():
        output = model(pixel_values=pixels, output_hidden_states=True)
    named = _named_outputs(output)
    return {name: _relative_error(named[name], ref) for name, ref in reference.items()}


def _plant_mismatch(model: torch.nn.Module, scale: float) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator).to(param)
            param.mul_(1 + scale * noise)


def verify(
    model: str, *, image_size: int, batch_size: int, dtype: str, device: str, backend: str
) -> int:
    """Fast path against the float32 reference; prints the table, returns 1 past tolerance."""
    if os.environ.get(BACKEND_ENV_VAR):
        raise UserError(
            f"unset {BACKEND_ENV_VAR}: it forces one backend on both sides of the check"
        )
    plant = os.environ.get(PLANT_ENV)
    try:
        scale = float(plant) if plant else 0.0
    except ValueError:
        raise UserError(f"{PLANT_ENV} must be a number (a test hook), got {plant!r}") from None
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    check_backend(backend, torch_device)
    reference = load_model(
        model, dtype=torch.float32, device=torch_device, backend="torch", allow_random_size=True
    )
    check_image_size(image_size, reference.config.patch_size, "--image-size")
    fast = copy.deepcopy(reference).to(dtype=torch_dtype)
    pixels = torch.randn(
        batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)
    ).to(torch_device)
    with torch.inference_mode():
        ref_output = reference(pixel_values=pixels, output_hidden_states=True)
    truth = _named_outputs(ref_output)
    low = pixels.to(torch_dtype)
    if torch_dtype == torch.float32:
        torch_errors = dict.fromkeys(truth, 0.0)
    else:
        torch_errors = _errors(fast.set_backend("torch"), low, truth)
    if scale:
        _plant_mismatch(fast, scale)
    with count_launches() as launches:
        fast_errors = _errors(fast.set_backend(backend), low, truth)

    name = dtype_name(torch_dtype)
    floor = _ERROR_FLOOR[torch_dtype]
    rows, failed = [], []
    for key in truth:
        limit = 2 * torch_errors[key] + floor
        ok = fast_errors[key] <= limit  # NaN fails too
        failed += [] if ok else [key]
        errors = (f"{e:.2e}" for e in (torch_errors[key], fast_errors[key], limit))
        rows.append([key, *errors, "ok" if ok else "FAIL"])
    kernels = sum(launches.values())
    print(
        f"verify {model}: {batch_size}x3x{image_size}x{image_size} on {torch_device}, "
        f"fast path {name} --backend {backend} ({kernels} Triton kernel launches) "
        f"vs the float32 PyTorch reference"
    )
    print(_table([["output", f"torch {name}", f"fast {name}", "limit", ""], *rows]))
    if not kernels and backend != "torch":
        print(
            "note: no Triton kernel ran (see `dinov2-fast info`): both sides took the PyTorch path"
        )
    if failed:
        print(f"FAIL: {len(failed)} of {len(rows)} outputs past the limit, first: {failed[0]}")
        return 1
    print(f"PASS: relative errors within 2x PyTorch's own {name} error + {floor:.0e}")
    return 0


def _median_seconds(step: Callable[[], object], iters: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # Warm-up runs compile kernels and fill caches.
    for _ in range(2):
        step()
    samples = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        step()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _transformers_twin(
    model: torch.nn.Module, dtype: torch.dtype, device: torch.device
) -> torch.nn.Module | None:
    """transformers' model of the same architecture (random weights: timing only)."""
    try:
        import transformers
    except ImportError:
        return None
    fields = model.config.to_dict()
    hf_config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    twin = transformers.AutoModel.from_config(hf_config)
    return twin.to(device=device, dtype=dtype).eval()


def bench(
    model: str,
    *,
    batches: Sequence[int] | None,
    image_size: int,
    iters: int | None,
    dtype: str,
    device: str,
    backend: str,
) -> int:
    """Time forward passes per batch size, against transformers when installed."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    on_gpu = torch_device.type == "cuda"
    batches = batches or ([1, 32, 128] if on_gpu else [1, 8])
    iters = iters or (20 if on_gpu else 3)
    ours = load_model(
        model, dtype=torch_dtype, device=torch_device, backend=backend, allow_random_size=True
    )
    check_image_size(image_size, ours.config.patch_size, "--image-size")
    candidates = [(f"dinov2_fast --backend {backend}", ours)]
    twin = _transformers_twin(ours, torch_dtype, torch_device)
    if twin is not None:
        candidates.append((f"transformers {_version('transformers')}", twin))
    rows, plan_lines = [], []
    for batch in batches:
        pixels = torch.randn(
            batch, 3, image_size, image_size, device=torch_device, dtype=torch_dtype
        )
        seconds = {}
        with torch.inference_mode():
            for label, net in candidates:
                step = functools.partial(net, pixel_values=pixels)
                seconds[label] = _median_seconds(step, iters, torch_device)
        plan_lines.append(f"batch {batch} {_plan_line(ours, pixels)}")
        baseline = seconds.get(candidates[-1][0])
        for label, spent in seconds.items():
            speedup = f"{baseline / spent:.2f}x" if twin is not None else "-"
            rows.append([label, str(batch), f"{spent * 1e3:.1f}", f"{batch / spent:.1f}", speedup])
    print(
        f"bench {model}: {image_size}x{image_size}, {dtype_name(torch_dtype)} on "
        f"{torch_device}, median of {iters}"
    )
    print(_table([["model", "batch", "ms/batch", "images/s", "vs transformers"], *rows]))
    print("\n".join(plan_lines))
    if twin is None:
        print("(install transformers to compare against it)")
    return 0
