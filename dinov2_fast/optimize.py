"""Put transformers' own DINOv2 models on the fused ops, in place.

``optimize(model)`` keeps the model's class, config, parameters and ``state_dict`` keys; it
rebinds ``forward`` on each ``Dinov2Layer`` instance (and the final LayerNorm) so every block
runs one packed QKV GEMM, flash attention on the packed output, residual + LayerScale +
LayerNorm in one pass and the GELU or SwiGLU op. The layers are still called as modules, so
transformers' hooks still collect ``hidden_states``. Calls the kernels cannot serve take the
original forward: recorded attention probabilities, gradients, active dropout.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from . import fused, ops

__all__ = ["ATTENTION_IMPLEMENTATION", "optimize", "register_attention_implementation"]

ATTENTION_IMPLEMENTATION = "dinov2_fast"

_SUPPORTED = (
    "Dinov2Model",
    "Dinov2ForImageClassification",
    "Dinov2Backbone",
    "Dinov2WithRegistersModel",
    "Dinov2WithRegistersForImageClassification",
    "Dinov2WithRegistersBackbone",
)


def _transformers_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract on top of ``ops.attention_split``.

    q, k, v arrive as (B, H, N, Dh) strided views of three projections; the kernel reads
    them in place (no stack, permute or copy) and returns (B, N, H, Dh), as transformers'
    SDPA function does. Masks and dropout take transformers' SDPA function.
    """
    if attention_mask is not None or (dropout > 0 and module.training):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    return ops.attention_split(query, key, value, scale=scaling), None


def register_attention_implementation() -> str:
    """Register the flash-attention kernel with transformers as ``"dinov2_fast"``, so
    ``from_pretrained(..., attn_implementation="dinov2_fast")`` can name it. Returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, _transformers_attention)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, _image_mask)
    return ATTENTION_IMPLEMENTATION


def _image_mask(
    *, attention_mask: torch.Tensor | None = None, **kwargs: Any
) -> torch.Tensor | None:
    """Images have no padding: no mask (the kernel's case) unless one was given."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(attention_mask=attention_mask, **kwargs)


def _recording_attentions() -> bool:
    """Whether transformers' output hooks are collecting attention probabilities now."""
    from transformers.utils.output_capturing import _active_collector

    # Under torch.compile transformers keeps the collector in a plain attribute, since
    # dynamo cannot trace ContextVar.get.
    if torch.compiler.is_compiling():
        collected = _active_collector.global_var
    else:
        collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def _fused_ops_backend(module: nn.Module, hidden_states: torch.Tensor) -> str | None:
    """The ops backend that may run this module fused now, or None for its own forward:
    the kernels cannot run here, or the call needs gradients, training behaviour or the
    attention probabilities transformers is recording."""
    backend = ops.current_backend()
    if backend == "torch" or not ops.triton_available(hidden_states.device):
        if backend == "triton":
            raise RuntimeError(
                f"backend 'triton' is forced but the kernels cannot run on {hidden_states.device}"
            )
        return None
    if module.training or fused.needs_grad(module, hidden_states) or _recording_attentions():
        return None
    return backend


def _fused_layer_forward(
    self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """A transformers ``Dinov2Layer`` on the fused ops; the class's own forward otherwise.

    Bound to each layer instance by ``optimize``; a module-level function (no closure), so
    ``copy.deepcopy`` rebinds it to the copy.
    """
    backend = _fused_ops_backend(self, hidden_states)
    if backend is None or any(a is not None for a in (*args, *kwargs.values())):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    with fused.on_device(hidden_states.device):
        run = fused.executor_for(
            self, self._dinov2_fast_config, [self], None, hidden_states, backend
        )
        norm1 = self.norm1
        normed = run.layer_norm(hidden_states, norm1.weight, norm1.bias, norm1.eps)
        return fused.fused_block(self, run, hidden_states, normed, None, None)[0]


def _fused_layernorm_forward(self: nn.LayerNorm, hidden_states: torch.Tensor) -> torch.Tensor:
    if _fused_ops_backend(self, hidden_states) is None:
        return type(self).forward(self, hidden_states)
    return ops.layer_norm(hidden_states, self.weight, self.bias, self.eps)


def optimize(model: nn.Module) -> nn.Module:
    """Put a transformers 5.x DINOv2 model (``Dinov2Model``, ``Dinov2ForImageClassification``,
    ``Dinov2Backbone`` or a with-registers class) on the fused ops, in place; returns it.

    The kernels run where ``dinov2_fast.ops`` can run them (CUDA, or the Triton interpreter),
    the reference ops elsewhere. Idempotent; ``copy.deepcopy`` keeps it. The patched
    instances do not pickle: save with ``save_pretrained`` or ``state_dict()``.
    """
    name = type(model).__name__
    if name not in _SUPPORTED or not type(model).__module__.startswith("transformers."):
        raise TypeError(
            f"optimize() takes a transformers DINOv2 model ({', '.join(_SUPPORTED)}), got {name}; "
            "dinov2_fast's own models are fused already (model.set_backend('auto'))"
        )
    layers = [
        m for m in model.modules() if type(m).__name__.endswith("Layer") and hasattr(m, "mlp")
    ]
    norms = [m for n, m in model.named_modules() if n.split(".")[-1] == "layernorm"]
    for layer in layers:
        _check_layer(layer)
    for layer in layers:
        layer._dinov2_fast_config = model.config
        fused.packed_qkv(layer.attention.attention)
        layer.forward = types.MethodType(_fused_layer_forward, layer)
    for norm in norms:
        norm.forward = types.MethodType(_fused_layernorm_forward, norm)
    register_attention_implementation()
    return model


def _check_layer(layer: nn.Module) -> None:
    required = (
        "norm1",
        "norm2",
        "attention.attention.query",
        "attention.attention.key",
        "attention.attention.value",
        "attention.output.dense",
        "layer_scale1",
        "layer_scale2",
    )
    missing = [path for path in required if not _has_path(layer, path)]
    mlp = layer.mlp
    if not (hasattr(mlp, "weights_in") or (hasattr(mlp, "fc1") and hasattr(mlp, "activation"))):
        missing.append("mlp.fc1/activation or mlp.weights_in")
    if missing:
        raise TypeError(
            f"this {type(layer).__name__} lacks {missing}: optimize() supports the module "
            "layout of transformers 5.17"
        )


def _has_path(module: nn.Module, path: str) -> bool:
    for part in path.split("."):
        if not hasattr(module, part):
            return False
        module = getattr(module, part)
    return True
