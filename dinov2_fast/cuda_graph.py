"""CUDA-graph replay of a model's forward for fixed input shapes.

Small batches are expected to be launch-bound (a ViT block is a dozen kernels; not yet
measured on a GPU). Replaying a captured graph issues the whole forward at once.

Contract of ``cuda_graph(model)``'s callable:
- one graph per (shape, dtype, device) of ``pixel_values``, captured on first use;
- inputs are copied into the graph's static input buffer;
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
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import ops, plan

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

    def __call__(self, pixel_values: torch.Tensor) -> Any:
        if self.model.training:
            raise RuntimeError("cuda_graph replays inference only; call model.eval() first")
        device = next(self.model.parameters()).device
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.device != device:
            raise ValueError(
                f"pixel_values must be a tensor on the model's device {device}, got "
                f"{getattr(pixel_values, 'device', type(pixel_values))}"
            )
        key = (tuple(pixel_values.shape), pixel_values.dtype)
        entry = self._graphs.get(key)
        if entry is None or entry[0] != self._stamp():
            entry = self._capture(pixel_values)
            self._graphs[key] = entry
        _, graph, static_input, static_output = entry
        with torch.cuda.device(device):
            static_input.copy_(pixel_values)
            graph.replay()
        if self.copy_outputs:
            return _map_tensors(static_output, torch.Tensor.clone)
        return static_output

    @torch.no_grad()
    def _capture(self, pixel_values: torch.Tensor) -> tuple[Any, ...]:
        with torch.cuda.device(pixel_values.device):
            static_input = pixel_values.clone()
            # Warm up on a side stream: kernel compilation, autotuning and weight packing
            # cannot happen inside a capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup_steps):
                    self.model(static_input, **self.forward_kwargs)
            torch.cuda.current_stream().wait_stream(side)
            # Each graph gets its own memory pool, so one shape's replay never writes into
            # another shape's static outputs.
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = self.model(static_input, **self.forward_kwargs)
        # Stamped after the warm-up, which may have re-packed weights (new addresses).
        return self._stamp(), graph, static_input, static_output


def cuda_graph(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    *,
    copy_outputs: bool = True,
    **forward_kwargs: Any,
) -> CudaGraphRunner:
    """A callable replaying ``model``'s forward from CUDA graphs (see the module docstring).

    ``example_input`` captures its shape right away; ``forward_kwargs`` (e.g.
    ``output_hidden_states=True``) are passed to every call.
    """
    runner = CudaGraphRunner(model, copy_outputs=copy_outputs, **forward_kwargs)
    if example_input is not None:
        runner(example_input)
    return runner
