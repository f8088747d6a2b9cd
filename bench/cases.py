"""What is measured: model and kernel cases for each matrix.

Matrices: ``cpu`` (tiny shapes that CI runs, kernels under the Triton interpreter),
``check`` (the headline questions of the GPU check, in priority order), ``extra`` (what the
GPU check adds when time is left) and ``full`` (the whole suite, for a long lease).
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import torch

import dinov2_fast

from .harness import DTYPE_NAMES

MATRICES = ("cpu", "check", "extra", "full")

MODEL_PROVIDERS = (
    "dinov2_fast",
    "dinov2_fast+cudagraph",
    "dinov2_fast-torch",
    "hf-sdpa",
    "hf-eager",
    "hf-compile",
    "xformers",
    "hf-optimized",
)
SDPA_PROVIDERS = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math")
KERNEL_PROVIDERS = ("dinov2_fast", "torch", *SDPA_PROVIDERS, "xformers", "torch-compile")
# Providers whose forward must launch our Triton kernels (a silent fallback would be timed
# as the fast path otherwise).
TRITON_PROVIDERS = ("dinov2_fast", "dinov2_fast+cudagraph", "hf-optimized")
KERNELS = ("layer_norm", "add_layerscale_layernorm", "gelu", "swiglu", "attention")


@dataclass(frozen=True)
class ModelSpec:
    """A DINOv2 architecture: a released size (patch 14 unless overridden)."""

    name: str
    size: str
    overrides: tuple[tuple[str, object], ...] = ()

    def config(self) -> dinov2_fast.Dinov2Config:
        return dinov2_fast.Dinov2Config.for_size(self.size, **dict(self.overrides))

    @property
    def patch_size(self) -> int:
        return self.config().patch_size


SMALL = ModelSpec("dinov2-small", "small")
BASE = ModelSpec("dinov2-base", "base")
LARGE = ModelSpec("dinov2-large", "large")
GIANT = ModelSpec("dinov2-giant", "giant")
BASE_P16 = ModelSpec("dinov2-base-p16", "base", (("patch_size", 16),))
# CPU mode only: two 128-wide blocks with 64-wide heads, small enough for the interpreter.
_TINY_FIELDS = (("hidden_size", 128), ("num_hidden_layers", 2), ("num_attention_heads", 2))
TINY = ModelSpec("dinov2-tiny", "small", _TINY_FIELDS)
TINY_P16 = ModelSpec("dinov2-tiny-p16", "small", (*_TINY_FIELDS, ("patch_size", 16)))
TINY_SWIGLU = ModelSpec("dinov2-tiny-swiglu", "small", (*_TINY_FIELDS, ("use_swiglu_ffn", True)))


@dataclass(frozen=True)
class Setting:
    """A model at an input shape: what a case runs, or where a kernel shape comes from."""

    spec: ModelSpec
    height: int
    width: int
    batch: int
    dtype: torch.dtype

    @property
    def image_size(self) -> int | str:
        """The side for square images, ``"HxW"`` otherwise (the results' ``image_size``)."""
        return self.height if self.height == self.width else f"{self.height}x{self.width}"

    @property
    def tokens(self) -> int:
        patch = self.spec.patch_size
        return 1 + (self.height // patch) * (self.width // patch)

    @property
    def label(self) -> str:
        return f"{self.spec.name}-{self.image_size}px-b{self.batch}-{DTYPE_NAMES[self.dtype]}"


@dataclass(frozen=True)
class Case:
    """One measurement: a provider at a setting, of one kernel in the kernel suite."""

    setting: Setting
    provider: str
    kernel: str | None = None

    @property
    def id(self) -> str:
        kernel = [self.kernel] if self.kernel else []
        return "-".join([*kernel, self.setting.label, self.provider])


def unavailable(provider: str, device: torch.device) -> str | None:
    """Why ``provider`` cannot run on ``device`` (None when it can, or when only a try will
    tell, as for SDPA's backends)."""
    on_gpu = device.type == "cuda"
    if provider in TRITON_PROVIDERS and not dinov2_fast.ops.triton_available(device):
        return "the Triton path cannot run here (no triton, or no GPU and no interpreter)"
    if provider == "dinov2_fast+cudagraph" and not on_gpu:
        return "CUDA graphs need a GPU"
    if provider in ("hf-compile", "torch-compile") and not on_gpu:
        return "CPU mode leaves torch.compile out: its C++ builds take minutes on a CI CPU"
    if provider == "xformers":
        if importlib.util.find_spec("xformers") is None:
            return "xformers is not installed"
        if not on_gpu:
            return "xformers needs a GPU"
    return None


def _settings(
    specs: Iterable[ModelSpec],
    images: Iterable[tuple[int, int]],
    batches: Iterable[int],
    dtypes: Iterable[torch.dtype],
) -> list[Setting]:
    grid = itertools.product(specs, images, batches, dtypes)
    return [Setting(spec, h, w, batch, dtype) for spec, (h, w), batch, dtype in grid]


def _model_cases(settings: Iterable[Setting], providers: Iterable[str]) -> list[Case]:
    return [Case(s, p) for s in settings for p in providers]


_BF16, _FP16 = torch.bfloat16, torch.float16
_LARGE_224_B64 = Setting(LARGE, 224, 224, 64, _BF16)
_GIANT_518_B8 = Setting(GIANT, 518, 518, 8, _BF16)
_BASE_224_B1 = Setting(BASE, 224, 224, 1, _BF16)


def model_cases(matrix: str) -> list[Case]:
    """The model suite's cases of ``matrix``, in the order they run."""
    if matrix == "cpu":
        return [
            *_model_cases(_settings([TINY], [(56, 56)], [1, 2], [_BF16]), MODEL_PROVIDERS),
            *_model_cases(_settings([TINY], [(56, 42)], [2], [_FP16]), MODEL_PROVIDERS),
            *_model_cases(_settings([TINY_P16], [(64, 64)], [2], [_BF16]), MODEL_PROVIDERS),
        ]
    if matrix == "check":
        # The targets of issue 4 first, so a run cut short loses the least; the compile of
        # transformers' model (the slowest step) last.
        return [
            *_model_cases([_LARGE_224_B64], ["dinov2_fast", "hf-sdpa"]),
            *_model_cases([_GIANT_518_B8], ["dinov2_fast", "hf-sdpa"]),
            *_model_cases(
                [_BASE_224_B1], ["dinov2_fast", "dinov2_fast+cudagraph", "hf-eager", "hf-sdpa"]
            ),
            Case(_LARGE_224_B64, "hf-compile"),
        ]
    if matrix == "extra":
        return [
            *_model_cases(
                [_LARGE_224_B64],
                ["dinov2_fast+cudagraph", "hf-optimized", "xformers", "hf-eager"],
            ),
            *_model_cases([_GIANT_518_B8], ["xformers", "hf-eager"]),
            *_model_cases(
                [Setting(LARGE, 224, 224, 64, _FP16), Setting(BASE_P16, 224, 224, 64, _BF16)],
                ["dinov2_fast", "hf-sdpa"],
            ),
            *_model_cases([Setting(LARGE, 518, 294, 8, _BF16)], ["dinov2_fast", "hf-sdpa"]),
            *_model_cases([_BASE_224_B1], ["dinov2_fast-torch"]),
        ]
    if matrix == "full":
        p14 = _settings(
            [SMALL, BASE, LARGE, GIANT],
            [(224, 224), (518, 518), (518, 294)],
            [1, 8, 32, 64, 128],
            [_BF16, _FP16],
        )
        p16 = _settings(
            [BASE_P16], [(224, 224), (512, 512), (512, 288)], [1, 8, 32, 64, 128], [_BF16, _FP16]
        )
        return _model_cases([*p14, *p16], MODEL_PROVIDERS)
    raise ValueError(f"unknown matrix {matrix!r}; choose from {MATRICES}")


def _kernel_providers(kernel: str, with_compile: bool = True) -> tuple[str, ...]:
    """Every kernel against eager PyTorch (and torch.compile); attention also against SDPA's
    backends and xformers."""
    providers = (
        KERNEL_PROVIDERS if kernel == "attention" else ("dinov2_fast", "torch", "torch-compile")
    )
    return providers if with_compile else providers[:-1]


def _kernel_cases(pairs: Iterable[tuple[str, Setting]], compile_last: bool) -> list[Case]:
    """Every provider of every (kernel, setting); with ``compile_last`` the torch.compile
    cases (each a fresh compile) come after all the others."""
    pairs = list(pairs)
    cases = [
        Case(setting, provider, kernel)
        for kernel, setting in pairs
        for provider in _kernel_providers(kernel, with_compile=not compile_last)
    ]
    if compile_last:
        cases += [Case(setting, "torch-compile", kernel) for kernel, setting in pairs]
    return cases


def _model_kernels(setting: Setting) -> tuple[str, ...]:
    """The kernels a model's forward runs (its FFN takes either GELU or SwiGLU)."""
    ffn = "swiglu" if setting.spec.config().use_swiglu_ffn else "gelu"
    return ("attention", "layer_norm", "add_layerscale_layernorm", ffn)


def kernel_cases(matrix: str) -> list[Case]:
    """The kernel suite's cases of ``matrix``, in the order they run; shapes are those of
    the DINOv2 settings they name."""
    if matrix == "cpu":
        tiny = Setting(TINY, 56, 56, 2, _BF16)
        pairs = [(k, tiny) for k in KERNELS if k != "swiglu"]
        pairs.append(("swiglu", Setting(TINY_SWIGLU, 56, 56, 2, _BF16)))
        return _kernel_cases(pairs, compile_last=False)
    if matrix == "check":
        pairs = [
            *[(k, _LARGE_224_B64) for k in ("attention", "layer_norm", "add_layerscale_layernorm")],
            ("gelu", _LARGE_224_B64),
            *[(k, _GIANT_518_B8) for k in ("attention", "add_layerscale_layernorm", "swiglu")],
        ]
        return _kernel_cases(pairs, compile_last=True)
    if matrix == "extra":
        return []
    if matrix == "full":
        settings = [
            *_settings([SMALL, BASE, LARGE], [(224, 224)], [64], [_BF16, _FP16]),
            *_settings([BASE, LARGE, GIANT], [(518, 518)], [8], [_BF16, _FP16]),
        ]
        pairs = [(kernel, setting) for setting in settings for kernel in _model_kernels(setting)]
        return _kernel_cases(pairs, compile_last=True)
    raise ValueError(f"unknown matrix {matrix!r}; choose from {MATRICES}")
