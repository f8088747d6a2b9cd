"""The model suite's providers: one set of weights, run every way a user can pick."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from typing import Any

import torch

import dinov2_fast

from .cases import Setting

XFORMERS_ATTENTION = "bench_xformers"
INPUT_ROTATION = 3

Forward = Callable[[torch.Tensor], torch.Tensor]


def model_flops(config: dinov2_fast.Dinov2Config, height: int, width: int) -> float:
    """Forward FLOPs per image: every matmul at 2 FLOPs per multiply-add, attention at
    4·N²·D per layer; normalization and elementwise work left out."""
    patch = config.patch_size
    patches = (height // patch) * (width // patch)
    tokens = 1 + config.num_register_tokens + patches
    dim, ffn = config.hidden_size, config.ffn_hidden_size
    ffn_weights = 3 * dim * ffn if config.use_swiglu_ffn else 2 * dim * ffn
    per_layer = 2 * tokens * (4 * dim * dim + ffn_weights) + 4 * tokens**2 * dim
    embedding = 2 * patches * config.num_channels * patch**2 * dim
    return embedding + config.num_hidden_layers * per_layer


def _xformers_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract on ``xformers.ops.memory_efficient_attention``:
    (B, H, N, Dh) in, (B, N, H, Dh) out."""
    import xformers.ops

    if attention_mask is not None or dropout:
        raise ValueError("the xformers benchmark provider runs inference without masks only")
    out = xformers.ops.memory_efficient_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scaling
    )
    return out, None


def _hf_model(
    config: dinov2_fast.Dinov2Config, weights: dict[str, torch.Tensor], attention: str
) -> torch.nn.Module:
    """transformers' model of ``config`` whose parameters are the tensors of ``weights``."""
    import transformers

    fields = config.to_dict()
    hf_config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    if attention == XFORMERS_ATTENTION:
        transformers.AttentionInterface.register(XFORMERS_ATTENTION, _xformers_attention)
    with torch.device("meta"):
        model = transformers.AutoModel.from_config(hf_config, attn_implementation=attention)
    model.load_state_dict(weights, assign=True)
    return model.eval()


def _our_model(
    config: dinov2_fast.Dinov2Config, weights: dict[str, torch.Tensor], backend: str
) -> dinov2_fast.Dinov2Model:
    """dinov2_fast's model of ``config`` whose parameters are the tensors of ``weights``."""
    with torch.device("meta"):
        model = dinov2_fast.Dinov2Model(config)
    model.load_state_dict(weights, assign=True)
    return model.eval().set_backend(backend)


def build(
    provider: str, config: dinov2_fast.Dinov2Config, weights: dict[str, torch.Tensor]
) -> Forward:
    """``pixel_values -> last_hidden_state`` for ``provider``; compiling, autotuning and graph
    capture happen on the first call.

    The model takes the tensors of ``weights`` as its parameters (no copy): pass a dict that
    nothing else keeps (``Workbench.weights``), so that what the model frees is freed.
    """
    if provider in ("dinov2_fast", "dinov2_fast+cudagraph", "dinov2_fast-torch"):
        # "triton" rather than "auto": a path that cannot run raises instead of quietly
        # timing the reference.
        ours = _our_model(config, weights, "torch" if provider == "dinov2_fast-torch" else "triton")
        if provider == "dinov2_fast+cudagraph":
            replay = dinov2_fast.cuda_graph(ours)
            return lambda pixels: replay(pixels).last_hidden_state
        return lambda pixels: ours(pixels).last_hidden_state
    attention = {"hf-eager": "eager", "xformers": XFORMERS_ATTENTION}.get(provider, "sdpa")
    hf = _hf_model(config, weights, attention)
    if provider == "hf-optimized":
        dinov2_fast.optimize(hf)
    elif provider == "hf-compile":
        hf = torch.compile(hf)
    elif provider not in ("hf-sdpa", "hf-eager", "xformers"):
        raise ValueError(f"unknown model provider {provider!r}")
    return lambda pixels: hf(pixel_values=pixels).last_hidden_state


@contextlib.contextmanager
def _exact_fp32() -> Iterator[None]:
    """fp32 math without TF32 (cuDNN convolutions default to it), for the reference."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class Workbench:
    """The model under test, kept while consecutive cases share it: fp32 weights in our
    model on the reference path (each provider gets its own cast copy, ``weights``), and per
    setting the input batches and the fp32 reference output of the first."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._spec: Any = None
        self._reference: dinov2_fast.Dinov2Model | None = None
        self._batches: dict[Setting, tuple[list[torch.Tensor], torch.Tensor]] = {}

    def clear(self) -> None:
        self._spec, self._reference = None, None
        self._batches.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def _reference_model(self, setting: Setting) -> dinov2_fast.Dinov2Model:
        if self._spec != setting.spec:
            self.clear()
            torch.manual_seed(0)
            with torch.device(self.device):
                model = dinov2_fast.Dinov2Model(setting.spec.config())
            # Norm weights and LayerScale start at exactly 1 and biases at 0, values that
            # hide bugs in the error column: give every vector a spread.
            for param in model.parameters():
                if param.dim() == 1:
                    param.add_(torch.randn_like(param), alpha=0.1)
            self._reference = model.eval().set_backend("torch")
            self._spec = setting.spec
        return self._reference

    @torch.no_grad()
    def weights(self, setting: Setting) -> dict[str, torch.Tensor]:
        """A fresh copy of the model's weights in the setting's dtype, for one provider.

        Not shared and not kept here: the provider's model (``build`` assigns these very
        tensors as its parameters) holds the only references, so storage that it replaces is
        freed, not counted twice (dinov2_fast packs q/k/v into one tensor on its first fused
        forward), and the copy is part of the provider's measured memory.
        """
        reference = self._reference_model(setting)
        return {
            name: tensor.to(setting.dtype, copy=True)
            for name, tensor in reference.state_dict().items()
        }

    @torch.no_grad()
    def batches(self, setting: Setting) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Input batches to rotate through, and the fp32 reference output for the first (on
        the host, out of the GPU memory counts)."""
        reference = self._reference_model(setting)
        if setting not in self._batches:
            self._batches.clear()
            shape = (setting.batch, reference.config.num_channels, setting.height, setting.width)
            generator = torch.Generator().manual_seed(1)
            inputs = [
                torch.randn(shape, generator=generator).to(self.device, setting.dtype)
                for _ in range(INPUT_ROTATION)
            ]
            with _exact_fp32():
                expected = reference(inputs[0].float()).last_hidden_state.cpu()
            self._batches[setting] = inputs, expected
        return self._batches[setting]
