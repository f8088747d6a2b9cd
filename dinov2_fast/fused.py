"""The fused forward (DESIGN.md §3) and its dispatch: one decision per forward, lean launches.

Whether a forward can take the fused path (backend, device, gradients, what the call asks
for) is decided once per forward by ``fused_backend``. The plan in force (``dinov2_fast.plan``)
picks, per site, a kernel or its PyTorch counterpart; ``_Executor`` binds those choices to
plain callables once per plan, so a block is GEMMs and direct calls. In eager mode the
Triton launchers are called directly (a torch custom op costs ~30 us of host time per call);
only while ``torch.compile`` traces do the sites go through ``torch.ops.dinov2_fast.*``, which
the compiler sees as opaque calls.

Used by this library's models and, one layer at a time, by ``optimize()``'d transformers
models (same module names).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, plan, reference

__all__ = ["fused_backend", "fused_block", "packed_qkv", "run_blocks", "uses_exact_gelu"]


def uses_exact_gelu(config: Any) -> bool:
    """Whether the FFN is an MLP with exact GELU (the fused GELU op's case)."""
    return not config.use_swiglu_ffn and config.hidden_act == "gelu"


# -- gradients, decided without walking the parameters on every call --------------------

# Bumped whenever any module registers a parameter or a submodule anywhere (torch's global
# registration hooks), so a model's cached parameter list is known to be current.
_registrations = [0]


def _bump(*args: Any) -> None:
    _registrations[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_bump)
torch.nn.modules.module.register_module_module_registration_hook(_bump)


def _parameter_slots(model: nn.Module) -> list[tuple[dict[str, Any], str]]:
    """Every (owner's parameter dict, name) of ``model``, cached until a module or parameter
    is registered anywhere; read live, so a parameter swapped in place is seen."""
    cached = model.__dict__.get("_dinov2_fast_parameter_slots")
    if cached is None or cached[0] != _registrations[0]:
        slots = [(m._parameters, name) for m in model.modules() for name in m._parameters]
        cached = (_registrations[0], slots)
        model.__dict__["_dinov2_fast_parameter_slots"] = cached
    return cached[1]


def needs_grad(model: nn.Module, inputs: torch.Tensor) -> bool:
    """Whether this call builds an autograd graph the kernels (no backward yet) cannot serve.
    Free under ``no_grad``/``inference_mode``; otherwise one pass over the cached slots."""
    if not torch.is_grad_enabled():
        return False
    if inputs.requires_grad:
        return True
    for owner, name in _parameter_slots(model):
        p = owner.get(name)
        if p is not None and p.requires_grad:
            return True
    return False


def fused_backend(
    model: nn.Module, pixel_values: torch.Tensor, output_attentions: bool, attn_implementation: str
) -> str | None:
    """The ops backend for this forward of one of our models, or None for the module path.

    ``DINOV2_FAST_BACKEND`` (or an ``ops.use_backend`` block) overrides the model's backend.
    The module path serves what the kernels cannot: attention probabilities, an explicit
    ``eager``/``sdpa`` attention implementation, active dropout, and gradients. ``"auto"``
    fuses on CUDA only; ``"triton"`` also runs under the Triton interpreter and raises where
    no kernel can run.
    """
    backend = ops.forced_backend() or model.backend
    if backend == "torch":
        return None
    device = pixel_values.device
    if backend == "triton" and not ops.triton_available(device):
        raise RuntimeError(
            f"backend='triton' cannot run on {device}: it needs CUDA and triton, or "
            "TRITON_INTERPRET=1 for the CPU interpreter; use backend='auto' or 'torch'"
        )
    if backend == "auto" and not (device.type == "cuda" and ops.triton_available(device)):
        return None
    config = model.config
    dropout = model.training and (
        config.hidden_dropout_prob > 0
        or config.attention_probs_dropout_prob > 0
        or config.drop_path_rate > 0
    )
    if (
        output_attentions
        or attn_implementation in ("eager", "sdpa")
        or dropout
        or config.num_hidden_layers == 0
        or needs_grad(model, pixel_values)
    ):
        return None
    return backend


# -- packed QKV weights -----------------------------------------------------------------


def _packed_view(params: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensors as one ``cat`` along dim 0 without copying, if they are contiguous
    neighbours in one storage (else None). Separate storages that merely sit back to back
    (the CUDA allocator hands them out so) do not count: a view may not cross storages."""
    first = params[0]
    storage = first.untyped_storage()
    address = first.data_ptr()
    for p in params:
        if (
            p.data_ptr() != address
            or not p.is_contiguous()
            or p.dtype != first.dtype
            or p.untyped_storage().data_ptr() != storage.data_ptr()
        ):
            return None
        address += p.numel() * p.element_size()
    if address > storage.data_ptr() + storage.nbytes():
        return None
    shape = (sum(p.shape[0] for p in params), *first.shape[1:])
    # Detached: a view based on the Parameter itself would pin it (swap-based .to() fails).
    return first.detach().as_strided(shape, first.stride())


def _pack(params: list[nn.Parameter]) -> torch.Tensor:
    """Give ``params`` one packed storage (each becomes a view of it); returns it."""
    with torch.no_grad(), torch.inference_mode(False):
        packed = torch.cat([p.detach() for p in params])
    for param, view in zip(params, packed.split([p.shape[0] for p in params]), strict=True):
        param.data = view
    return packed


def packed_qkv(attention: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``[q | k | v]`` weight and bias of a self-attention module, for one QKV GEMM.

    The query, key and value parameters are made views of one packed tensor (on first use,
    and again whenever something gives them new storage: ``.to()``, ``deepcopy``,
    ``load_state_dict(assign=True)``), so the packed operand is a view of the live
    parameters: no copy to keep in sync, no extra memory, in-place updates seen at once.
    """
    projections = (attention.query, attention.key, attention.value)
    weights = [p.weight for p in projections]
    biases = [p.bias for p in projections] if attention.query.bias is not None else None
    weight = _packed_view(weights)
    if weight is None:
        weight = _pack(weights)
    if biases is None:
        return weight, None
    bias = _packed_view(biases)
    return weight, _pack(biases) if bias is None else bias


@torch.library.custom_op("dinov2_fast::qkv_projection", mutates_args=())
def _qkv_projection_op(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    v_weight: torch.Tensor,
    q_bias: torch.Tensor | None,
    k_bias: torch.Tensor | None,
    v_bias: torch.Tensor | None,
) -> torch.Tensor:
    """The QKV GEMM of a compiled forward: a view of the packed weights when the parameters
    are packed (they are after any eager forward, ``optimize`` or ``tune``), else a copy."""
    weights = [q_weight, k_weight, v_weight]
    weight = _packed_view(weights)
    if weight is None:
        weight = torch.cat(weights)
    bias = None
    if q_bias is not None:
        biases = [q_bias, k_bias, v_bias]
        bias = _packed_view(biases)
        if bias is None:
            bias = torch.cat(biases)
    return F.linear(x, weight, bias)


@_qkv_projection_op.register_fake
def _(x, q_weight, k_weight, v_weight, q_bias, k_bias, v_bias) -> torch.Tensor:
    rows = q_weight.shape[0] + k_weight.shape[0] + v_weight.shape[0]
    return x.new_empty((*x.shape[:-1], rows))


# -- the site implementations a plan names ---------------------------------------------


def _sdpa_attention(backend: str | None) -> Callable[..., torch.Tensor]:
    if backend is None:
        return reference.attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    forced = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }[backend]

    def attend(qkv: torch.Tensor, num_heads: int, **kwargs: Any) -> torch.Tensor:
        with sdpa_kernel(forced):
            return reference.attention(qkv, num_heads, **kwargs)

    return attend


def _triton_attention(config_name: str, compiling: bool) -> Callable[..., torch.Tensor]:
    if compiling:
        # The custom op takes the config by name ("": the autotuner's choice).
        def traced(qkv, num_heads, *, scale=None, head_scale=None, cu_seqlens=None,
                   max_seqlen=None, bounds=None):  # fmt: skip
            return ops._attention_op(
                qkv, num_heads, scale, head_scale, cu_seqlens, max_seqlen, config_name
            )

        return traced
    from .kernels import attention

    config = attention.AttentionConfig.from_name(config_name) if config_name else None

    def launch(qkv, num_heads, *, scale=None, head_scale=None, cu_seqlens=None,
               max_seqlen=None, bounds=None):  # fmt: skip
        return attention.flash_attention(
            qkv, num_heads, scale, head_scale, cu_seqlens, max_seqlen, config=config,
            bounds=bounds,
        )[0]  # fmt: skip

    return launch


def _gelu_epilogue(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """fc1 with GELU in cuBLASLt's epilogue (its tanh form on CUDA, exact erf on the CPU)."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch._addmm_activation(bias, rows, weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


class _Executor:
    """A plan bound to callables: what one block calls, with no decisions left to make."""

    def __init__(self, chosen: plan.Plan, ffn_kind: str, compiling: bool) -> None:
        self.plan = chosen
        self.compiling = compiling
        kind, _, detail = chosen.attention.partition(":")
        if kind == "triton":
            self.attention = _triton_attention(detail, compiling)
        else:
            self.attention = _sdpa_attention(detail or None)
        if chosen.norm == "triton":
            if compiling:
                self.layer_norm = ops._layer_norm_op
                self.add_norm = ops._add_layerscale_layernorm_op
            else:
                from .kernels import layernorm

                self.layer_norm = layernorm.layer_norm
                self.add_norm = layernorm.add_layerscale_layernorm
        else:
            self.layer_norm = reference.layer_norm
            self.add_norm = reference.add_layerscale_layernorm
        self.ffn = self._ffn(ffn_kind, chosen.ffn, compiling)

    @staticmethod
    def _ffn(ffn_kind: str, name: str, compiling: bool) -> Callable[[_BlockParts, Any], Any]:
        """``ffn(parts, x)``: the block's FFN on its (in, out) GEMM weights."""
        if ffn_kind == "mlp":
            return lambda parts, x: parts.mlp.fc2(parts.mlp.activation(parts.mlp.fc1(x)))
        if ffn_kind == "swiglu":
            if name == "triton":
                act = ops._swiglu_op if compiling else _kernel("swiglu", "swiglu")
            else:
                act = reference.swiglu
        elif name == "epilogue":
            return lambda parts, x: F.linear(
                _gelu_epilogue(x, parts.ffn_in_weight, parts.ffn_in_bias),
                parts.ffn_out_weight,
                parts.ffn_out_bias,
            )
        elif name == "triton":
            act = (lambda h: ops._gelu_op(h, None)) if compiling else _kernel("gelu", "gelu")
        else:
            act = F.gelu

        def ffn(parts: _BlockParts, x: torch.Tensor) -> torch.Tensor:
            hidden = act(F.linear(x, parts.ffn_in_weight, parts.ffn_in_bias))
            return F.linear(hidden, parts.ffn_out_weight, parts.ffn_out_bias)

        return ffn


def _kernel(module: str, name: str) -> Callable[..., Any]:
    import importlib

    return getattr(importlib.import_module(f"dinov2_fast.kernels.{module}"), name)


def ffn_kind(config: Any) -> str:
    """``"swiglu"``, ``"gelu"`` (exact-GELU MLP) or ``"mlp"`` (another activation)."""
    if config.use_swiglu_ffn:
        return "swiglu"
    return "gelu" if uses_exact_gelu(config) else "mlp"


_EXECUTORS: dict[tuple[plan.Plan, str, bool], _Executor] = {}
# The executors of compile traces, by text key: a traced forward looks its executor up here
# with a key that ``_traced_executor_key`` (run as plain Python at trace time) made.
_TRACED_EXECUTORS: dict[str, _Executor] = {}


def _executor(chosen: plan.Plan, kind: str, compiling: bool) -> _Executor:
    run = _EXECUTORS.get((chosen, kind, compiling))
    if run is None:
        run = _EXECUTORS[chosen, kind, compiling] = _Executor(chosen, kind, compiling)
    return run


# -- one block, all blocks ---------------------------------------------------------------


class Packing:
    """Images of different sizes as one (T, D) token stream: their token counts, the
    ``cu_seqlens`` of varlen attention (cached per list of counts, so a fixed list of sizes
    builds it once and a CUDA graph can capture the forward) and its host copy, which the
    attention checks instead of reading the device (no host sync per layer)."""

    _cu_seqlens: dict[tuple[Any, ...], torch.Tensor] = {}

    def __init__(self, lengths: list[int], device: torch.device) -> None:
        self.lengths = lengths
        self.bounds = [0]
        for n in lengths:
            self.bounds.append(self.bounds[-1] + n)
        self.max_seqlen = max(lengths)
        key = (tuple(lengths), device)
        cu_seqlens = self._cu_seqlens.get(key)
        if cu_seqlens is None:
            cu_seqlens = torch.tensor(self.bounds, dtype=torch.int32, device=device)
            if len(self._cu_seqlens) > 256:
                self._cu_seqlens.clear()
            self._cu_seqlens[key] = cu_seqlens
        self.cu_seqlens = cu_seqlens
        self.attention_arguments = {
            "cu_seqlens": cu_seqlens,
            "max_seqlen": self.max_seqlen,
            "bounds": self.bounds,
        }


def fused_block(
    layer: nn.Module,
    run: _Executor,
    hidden_states: torch.Tensor,
    normed: torch.Tensor,
    head_scale: torch.Tensor | None,
    next_norm: nn.LayerNorm | None,
    packing: Packing | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One block on the plan's ops (DESIGN.md §3), given ``normed = norm1(hidden_states)``.

    ``layer`` is a ``Dinov2Layer`` of this library or of transformers (same module names).
    Returns the block's output and, when ``next_norm`` is given (the next block's norm1 or
    the final LayerNorm), its LayerNorm from the same pass over the residual stream. With
    ``packing`` the tokens of several images are one (T, D) stream and attention is varlen.
    """
    varlen = {} if packing is None else packing.attention_arguments
    parts = _BlockParts(layer) if run.compiling else _block_parts(layer)
    context = run.attention(
        parts.qkv(normed, run.compiling),
        parts.heads,
        scale=parts.scale,
        head_scale=None if head_scale is None else head_scale.flatten(),
        **varlen,
    )
    hidden_states, normed = run.add_norm(
        hidden_states,
        F.linear(context, parts.proj_weight, parts.proj_bias),
        parts.layer_scale1,
        parts.norm2_weight,
        parts.norm2_bias,
        parts.norm2_eps,
    )
    ffn = run.ffn(parts, normed)
    if next_norm is None:
        return torch.addcmul(hidden_states, parts.layer_scale2, ffn), None
    return run.add_norm(
        hidden_states, ffn, parts.layer_scale2, next_norm.weight, next_norm.bias, next_norm.eps
    )


class _BlockParts:
    """What a fused block reads of a layer, gathered once: module attribute lookups cost a
    fused block more host time than its kernel launches. Parameters are held as the live
    objects (``.data`` writes and ``.to()`` are seen); a layer whose parameters or submodules
    are re-registered gets new parts (``_block_parts``)."""

    def __init__(self, layer: nn.Module) -> None:
        attention = layer.attention.attention
        self.attention = attention
        self.heads = attention.num_attention_heads
        self.scale = attention.scaling
        dense = layer.attention.output.dense
        self.proj_weight, self.proj_bias = dense.weight, dense.bias
        self.layer_scale1 = layer.layer_scale1.lambda1
        self.layer_scale2 = layer.layer_scale2.lambda1
        norm2 = layer.norm2
        self.norm2_weight, self.norm2_bias, self.norm2_eps = norm2.weight, norm2.bias, norm2.eps
        self.mlp = mlp = layer.mlp
        ffn_in, ffn_out = (
            (mlp.weights_in, mlp.weights_out) if hasattr(mlp, "weights_in") else (mlp.fc1, mlp.fc2)
        )
        self.ffn_in_weight, self.ffn_in_bias = ffn_in.weight, ffn_in.bias
        self.ffn_out_weight, self.ffn_out_bias = ffn_out.weight, ffn_out.bias
        # The parts are current while every (owner's parameter dict, name) still holds the
        # same object (functional_call and accelerate swap them in place); the ids are
        # those of live objects held here, so they cannot be reused while compared.
        slots = [
            (module._parameters, name) for module in layer.modules() for name in module._parameters
        ]
        self._owners = [owner for owner, _ in slots]
        self._names = [name for _, name in slots]
        self._held = [owner[name] for owner, name in slots]
        self._ids = list(map(id, self._held))
        projections = (attention.query, attention.key, attention.value)
        self._qkv_params = [p.weight for p in projections]
        if attention.query.bias is not None:
            self._qkv_params += [p.bias for p in projections]
        self._qkv_addresses: tuple[int, ...] = ()
        self._qkv_weight: torch.Tensor | None = None
        self._qkv_bias: torch.Tensor | None = None

    def qkv(self, normed: torch.Tensor, compiling: bool) -> torch.Tensor:
        """The QKV GEMM on the packed ``[q | k | v]`` weights (see ``packed_qkv``)."""
        if compiling:
            return _qkv_projection_op(normed, *self._qkv_params[:3], *self._qkv_tail())
        addresses = tuple(p.data_ptr() for p in self._qkv_params)
        if addresses != self._qkv_addresses:
            # New storage (.to(), a re-pack): views of the packed tensors again.
            self._qkv_weight, self._qkv_bias = packed_qkv(self.attention)
            self._qkv_addresses = tuple(p.data_ptr() for p in self._qkv_params)
        return F.linear(normed, self._qkv_weight, self._qkv_bias)

    def current(self) -> bool:
        """Whether every parameter slot still holds the object these parts read."""
        return list(map(id, map(dict.get, self._owners, self._names))) == self._ids

    def _qkv_tail(self) -> list[torch.Tensor | None]:
        return self._qkv_params[3:] if len(self._qkv_params) == 6 else [None, None, None]


def _block_parts(layer: nn.Module) -> _BlockParts:
    cached = layer.__dict__.get("_dinov2_fast_parts")
    if cached is None or cached[0] != _registrations[0] or not cached[1].current():
        cached = (_registrations[0], _BlockParts(layer))
        layer.__dict__["_dinov2_fast_parts"] = cached
    return cached[1]


def run_blocks(
    layers: list[nn.Module],
    run: _Executor,
    hidden_states: torch.Tensor,
    head_scales: list[torch.Tensor | None],
    output_hidden_states: bool,
    final_norm: nn.LayerNorm,
    packing: Packing | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Every block on the plan's ops; returns ``final_norm`` of the last block's output
    (fused into that block) and the per-layer outputs when asked for."""
    first = layers[0].norm1
    normed = run.layer_norm(hidden_states, first.weight, first.bias, first.eps)
    all_hidden = [hidden_states] if output_hidden_states else None
    layers = list(layers)  # slicing a ModuleList registers modules (and builds one)
    next_norms = [layer.norm1 for layer in layers[1:]] + [final_norm]
    for layer, head_scale, next_norm in zip(layers, head_scales, next_norms, strict=True):
        hidden_states, normed = fused_block(
            layer, run, hidden_states, normed, head_scale, next_norm, packing
        )
        if all_hidden is not None:
            all_hidden.append(hidden_states)
    return normed, None if all_hidden is None else tuple(all_hidden)


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' for the forward."""
    if device.type == "cuda" and torch.cuda.current_device() != device.index:
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# -- choosing the executor -------------------------------------------------------------


def model_signature(config: Any) -> str:
    """The model part of a plan key: what the sites' shapes depend on besides B and N."""
    return (
        f"D{config.hidden_size} L{config.num_hidden_layers} H{config.num_attention_heads} "
        f"{ffn_kind(config)} r{config.mlp_ratio}"
    )


def executor_for(
    owner: nn.Module,
    config: Any,
    layers: Any,
    final_norm: nn.LayerNorm | None,
    hidden_states: torch.Tensor,
    backend: str,
    packing: Packing | None = None,
) -> _Executor:
    """The executor of this forward: the forced plan, the cached one, or one tuned now.
    A compile trace takes the all-kernel plan (sites forced by set_plan or DINOV2_FAST_PLAN
    excepted) as a constant of the graph. A packed forward (``packing``) takes the plan of
    its (images, longest image) bucket and is never tuned itself (tuning times dense
    batches)."""
    if packing is None:
        batch, tokens = hidden_states.shape[0], hidden_states.shape[1]
    else:
        batch, tokens = len(packing.lengths), packing.max_seqlen
    if torch.compiler.is_compiling():
        key = _traced_executor_key(
            backend,
            owner.__dict__.get("_dinov2_fast_plan") or "",
            str(hidden_states.device),
            str(hidden_states.dtype),
            model_signature(config),
            ffn_kind(config),
            layers[0].attention.attention.attention_head_size,
            packing is not None,
        )
        return _TRACED_EXECUTORS[key]
    memo_key = (
        backend,
        owner.__dict__.get("_dinov2_fast_plan"),
        os.environ.get(plan.PLAN_ENV_VAR),
        hidden_states.device,
        hidden_states.dtype,
        batch,
        tokens,
        packing is not None,
        model_signature(config),
    )
    run = _RESOLVED.get(memo_key)
    if run is None:
        record = resolve(
            owner, config, layers, final_norm, hidden_states, backend,
            shape=(batch, tokens), may_tune=packing is None,
        )  # fmt: skip
        chosen = record.plan
        if packing is not None:
            head_dim = layers[0].attention.attention.attention_head_size
            chosen = _packed_plan(chosen, hidden_states.device, hidden_states.dtype, head_dim)
        run = _executor(chosen, ffn_kind(config), False)
        if record.reason != _NOT_TUNED or hidden_states.device.type != "cuda":
            # An untuned default on CUDA (a capture's first use) is tuned by a later forward.
            _RESOLVED[memo_key] = run
    return run


def _packed_plan(
    chosen: plan.Plan, device: torch.device, dtype: torch.dtype, head_dim: int
) -> plan.Plan:
    """SDPA takes one image at a time in a packed batch (a Python loop): the attention
    kernel serves it wherever it can run."""
    if chosen.attention.startswith("sdpa"):
        if ops._attention_model_blocker(device, dtype, head_dim) is None:
            return chosen.replace(attention="triton")
    return chosen


_NOT_TUNED = "not tuned for this shape yet: every site on its kernel until it is"
# Executors already resolved for (backend, forced plans, device, dtype, B, N, packed,
# model): a steady-state forward finds its own here. Cleared whenever a plan is tuned.
_RESOLVED: dict[tuple[Any, ...], _Executor] = {}


def _traced_executor_key_impl(
    backend: str,
    forced: str,
    device: str,
    dtype: str,
    model: str,
    kind: str,
    head_dim: int,
    packed: bool,
) -> str:
    # The batch and token counts are not arguments: dynamo makes them symbolic on a second
    # shape, a constant function cannot take a symbol, and traced code cannot tell a symbol
    # from an int. A trace therefore runs every site on its kernel (or as set_plan /
    # DINOV2_FAST_PLAN force, attention configs included), whatever the shape.
    sites = plan.forced_sites(forced or None)
    torch_device, torch_dtype = torch.device(device), getattr(torch, dtype.removeprefix("torch."))
    chosen = _fused_default(torch_device, torch_dtype, head_dim, sites, backend)
    if packed:
        chosen = _packed_plan(chosen, torch_device, torch_dtype, head_dim)
    text = f"{chosen}|{kind}"
    if text not in _TRACED_EXECUTORS:
        _TRACED_EXECUTORS[text] = _Executor(chosen, kind, compiling=True)
    return text


# Run as plain Python while dynamo traces; its result is a constant of the graph.
_traced_executor_key = torch._dynamo.assume_constant_result(_traced_executor_key_impl)


def _fused_default(
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    forced: Mapping[str, str],
    backend: str,
) -> plan.Plan:
    """Every site on its kernel, except attention where the kernel cannot take it (SDPA
    then; an error with backend "triton"), and the forced sites."""
    chosen = plan.FUSED
    blocker = ops._attention_model_blocker(device, dtype, head_dim)
    if blocker is not None and forced.get("attention", "triton").startswith("triton"):
        if backend == "triton":
            raise RuntimeError(f"backend 'triton' is forced but {blocker}")
        chosen = chosen.replace(attention="sdpa")
    return chosen.replace(**forced)


def resolve(
    owner: nn.Module,
    config: Any,
    layers: Any,
    final_norm: nn.LayerNorm,
    hidden_states: torch.Tensor,
    backend: str,
    *,
    timer: plan.Timer | None = None,
    retune: bool = False,
    may_tune: bool = True,
    shape: tuple[int, int] | None = None,
) -> plan.PlanRecord:
    """The plan record for this forward's shape (see ``dinov2_fast.plan``).

    ``backend="triton"`` runs every site on its kernel (sites forced by ``set_plan`` or
    ``DINOV2_FAST_PLAN`` excepted). ``"auto"`` uses the cached plan for the shape, tuning it
    now (on ``layers[0]``'s real input) when there is none and tuning can run; ``timer``
    (tests, ``tune``) tunes whatever the backend. ``shape`` is the (batch, tokens) of the
    key when ``hidden_states`` is not a dense (B, N, D) batch.
    """
    forced = plan.forced_sites(owner.__dict__.get("_dinov2_fast_plan"))
    device, dtype = hidden_states.device, hidden_states.dtype
    head_dim = layers[0].attention.attention.attention_head_size
    if backend == "triton" and timer is None:
        chosen = _fused_default(device, dtype, head_dim, forced, backend)
        return plan.PlanRecord(chosen, "backend 'triton': every site on its kernel")
    batch, tokens = shape or (hidden_states.shape[0], hidden_states.shape[1])
    key = plan.plan_key(device, dtype, model_signature(config), batch, tokens)
    record = None if retune else plan.lookup(key)
    if record is None:
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not may_tune or (timer is None and (capturing or device.type != "cuda")):
            chosen = _fused_default(device, dtype, head_dim, forced, backend)
            return plan.PlanRecord(chosen, _NOT_TUNED)
        from ._tuning import tune_layer

        # Every site is tuned, forced or not: the cache holds what is fastest, and forcing
        # applies on top of it.
        record = tune_layer(
            layers, final_norm, hidden_states, ffn_kind(config), timer or plan.cuda_timer
        )
        plan.remember(key, record)
        plan.log_tuned(key, record)
        _RESOLVED.clear()
    if forced:
        chosen = record.plan.replace(**forced)
        return plan.PlanRecord(chosen, f"forced by set_plan or {plan.PLAN_ENV_VAR}")
    return record


def plan_text(forced: str | Mapping[str, str] | None) -> str | None:
    """A plan given to ``set_plan`` as validated text (raises ValueError), or None."""
    if forced is None:
        return None
    return ",".join(f"{site}={name}" for site, name in plan.parse_plan(forced).items())


def _parts_of(model: nn.Module) -> tuple[nn.Module, Any, Any, nn.LayerNorm | None, nn.Module]:
    """(embeddings, config, layers, final norm, plan owner) of one of our models or of an
    ``optimize()``d transformers model."""
    # Heads hold the encoder as their base model (ours and transformers' alike).
    base = getattr(model, "base_model", model)
    embeddings = getattr(base, "embeddings", None)
    encoder = getattr(base, "encoder", None)
    if embeddings is None or encoder is None:
        raise TypeError(
            f"tune() takes a dinov2_fast model or an optimize()d transformers DINOv2 model, "
            f"got {type(model).__name__}"
        )
    layers = encoder.layer
    if type(base).__module__.startswith("transformers."):
        if "_dinov2_fast_config" not in layers[0].__dict__:
            raise TypeError("this transformers model is not optimized: call optimize(model) first")
        # Optimized layers resolve their plan one layer at a time, with no fused final norm.
        return embeddings, base.config, layers, None, layers[0]
    return embeddings, base.config, layers, base.layernorm, base


def tune(
    model: nn.Module,
    pixel_values: torch.Tensor,
    *,
    timer: plan.Timer | None = None,
    retune: bool = False,
) -> plan.PlanRecord:
    """Choose (or look up) the plan for ``pixel_values``' shape ahead of serving, so that no
    live request pays for tuning; returns the record in force, with what was timed.

    Runs on CUDA (CUDA-event timing); ``timer`` replaces the clock (tests drive the
    selection on the CPU with it). ``retune=True`` times again even when a plan is cached.
    """
    embeddings, config, layers, final_norm, owner = _parts_of(model)
    device = pixel_values.device
    if timer is None and device.type != "cuda":
        raise ValueError(
            f"tune() times the candidates on a CUDA device; these inputs are on {device}"
        )
    with torch.no_grad(), on_device(device):
        embedded = embeddings(pixel_values)
        record = resolve(
            owner, config, layers, final_norm, embedded, "auto", timer=timer, retune=retune
        )
    _RESOLVED.clear()
    return record


def plan_in_force(model: nn.Module, pixel_values: torch.Tensor) -> plan.PlanRecord | None:
    """The plan a forward of ``model`` on ``pixel_values`` would run, and why; None when the
    forward takes the module path (see ``fused_backend``). Never tunes."""
    embeddings, config, layers, final_norm, owner = _parts_of(model)
    backend = ops.forced_backend() or getattr(owner, "backend", "auto")
    if backend == "torch" or not ops.triton_available(pixel_values.device):
        return None
    if backend == "auto" and pixel_values.device.type != "cuda":
        return None
    with torch.no_grad():
        embedded = embeddings(pixel_values)
    return resolve(owner, config, layers, final_norm, embedded, backend, may_tune=False)
