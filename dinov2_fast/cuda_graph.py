"""CUDA-graph replay of a model's forward for fixed input shapes.

Small batches are expected to be launch-bound (a ViT block is a dozen kernels; not yet
measured on a GPU). Replaying a captured graph issues the whole forward at once.

Contract of ``cuda_graph(model)``'s callable:
- one graph per (shape, dtype, device) of ``pixel_values``, captured on first use; a list
  of ``(C, H_i, W_i)`` images (one packed forward, see ``Dinov2Model``) gets one graph per
  list of sizes;
- inputs are copied into the graph's static input buffers;
- outputs are fresh tensors by default (``copy_outputs=True``); with ``copy_outputs=False``
  they are the graph's static buffers, overwritten by the next call of the same shape;
- the graph reads the parameters where they live, so in-place updates (``.data`` writes
  included) are seen by the next replay; anything that gives a parameter or buffer new
  storage (``.to()``, ``load_state_dict(assign=True)``, assigning a new ``Parameter``) or
  changes the backend or the forced plan re-captures on the next call;
- the warm-up before a capture runs the model eagerly, so a shape whose plan is not tuned yet
  is tuned then, never inside the capture;
- inference only: it runs under ``torch.no_grad()`` and refuses a model in training mode.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from . import ops, plan
from .fused import Packing

__all__ = ["CudaGraphRunner", "cuda_graph"]


def _tensor_slots(model: nn.Module) -> list[tuple[dict[str, Any], str]]:
    """Where every parameter and buffer lives: (the owning module's dict, name)."""
    slots = []
    for module in model.modules():
        slots += [(module._parameters, name) for name in module._parameters]
        slots += [(module._buffers, name) for name in module._buffers]
    return slots


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if hasattr(value, "keys") and hasattr(value, "__getitem__"):
        return type(value)(**{k: _map_tensors(value[k], fn) for k in value.keys()})
    return value


class CudaGraphRunner:
    """Callable that replays ``model(pixel_values, **forward_kwargs)`` from CUDA graphs."""

    def __init__(
        self,
        model: nn.Module,
        *,
        copy_outputs: bool = True,
        warmup_steps: int = 2,
        **forward_kwargs: Any,
    ) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("cuda_graph needs a CUDA device; none is available")
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"cuda_graph needs the model on a CUDA device; it is on {device}")
        self.model = model
        self.copy_outputs = copy_outputs
        self.warmup_steps = warmup_steps
        self.forward_kwargs = forward_kwargs
        self._slots = _tensor_slots(model)
        self._graphs: dict[tuple[Any, ...], tuple[Any, ...]] = {}

    def _stamp(self) -> tuple[Any, ...]:
        """What a captured graph depends on besides the input: tensor addresses, backend."""
        addresses = tuple(
            None if (t := slots[name]) is None else t.data_ptr() for slots, name in self._slots
        )
        backend = (getattr(self.model, "backend", None), os.environ.get(ops.BACKEND_ENV_VAR))
        forced_plan = (
            self.model.__dict__.get("_dinov2_fast_plan"),
            os.environ.get(plan.PLAN_ENV_VAR),
        )
        return addresses, backend, forced_plan

    def __call__(self, pixel_values: torch.Tensor | Sequence[torch.Tensor]) -> Any:
        if self.model.training:
            raise RuntimeError("cuda_graph replays inference only; call model.eval() first")
        device = next(self.model.parameters()).device
        images = list(pixel_values) if isinstance(pixel_values, (list, tuple)) else [pixel_values]
        if not images:
            raise ValueError("pixel_values is an empty list; pass a tensor or (C, H, W) images")
        for image in images:
            if not isinstance(image, torch.Tensor) or image.device != device:
                raise ValueError(
                    f"pixel_values must be a tensor or a list of tensors on the model's device "
                    f"{device}, got {getattr(image, 'device', type(image).__name__)}"
                )
        # A list's sizes are part of the key: its packed forward is captured per list.
        key = (
            isinstance(pixel_values, torch.Tensor),
            tuple(tuple(image.shape) for image in images),
            tuple(image.dtype for image in images),
        )
        entry = self._graphs.get(key)
        if entry is None or entry[0] != self._stamp():
            entry = self._capture(pixel_values)
            self._graphs[key] = entry
        _, graph, static_input, static_output, _ = entry
        with torch.cuda.device(device):
            for buffer, image in zip(static_input, images, strict=True):
                buffer.copy_(image)
            graph.replay()
        if self.copy_outputs:
            return _map_tensors(static_output, torch.Tensor.clone)
        return static_output

    @torch.no_grad()
    def _capture(self, pixel_values: torch.Tensor | Sequence[torch.Tensor]) -> tuple[Any, ...]:
        is_list = isinstance(pixel_values, (list, tuple))
        static_input = [image.clone() for image in (pixel_values if is_list else [pixel_values])]
        model_input = static_input if is_list else static_input[0]
        with torch.cuda.device(static_input[0].device):
            # Warm up on a side stream: kernel compilation, autotuning, weight packing and a
            # list's cu_seqlens (cached per list of sizes) cannot happen inside a capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup_steps):
                    self.model(model_input, **self.forward_kwargs)
            torch.cuda.current_stream().wait_stream(side)
            # Each graph gets its own memory pool, so one shape's replay never writes into
            # another shape's static outputs.
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = self.model(model_input, **self.forward_kwargs)
        # The graph reads a list's cu_seqlens from the packing cache, which may drop it
        # later: the entry keeps them alive (a few int32 tensors).
        kept = list(Packing._cu_seqlens.values()) if is_list else []
        # Stamped after the warm-up, which may have re-packed weights (new addresses).
        return self._stamp(), graph, static_input, static_output, kept


def cuda_graph(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    copy_outputs: bool = True,
    **forward_kwargs: Any,
) -> CudaGraphRunner:
    """A callable replaying ``model``'s forward from CUDA graphs (see the module docstring).

    ``example_input`` (a tensor or a list of images) captures its shape right away;
    ``forward_kwargs`` (e.g. ``output_hidden_states=True``) are passed to every call.
    """
    runner = CudaGraphRunner(model, copy_outputs=copy_outputs, **forward_kwargs)
    if example_input is not None:
        runner(example_input)
    return runner
