"""DINOv2 with transformers' module names, arguments and outputs: the plain PyTorch modules
(the reference and CPU path), which hand inference to the fused forward of
``dinov2_fast.fused`` where it can run. Parameter names match transformers' on-disk
checkpoint keys exactly, so ``state_dict()`` of each class is interchangeable with the
transformers class of the same name.
"""

from __future__ import annotations

import enum
import math
import os
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import fused, ops, packed
from .config import Dinov2Config
from .outputs import BackboneOutput, BaseModelOutputWithPooling, ImageClassifierOutput

__all__ = [
    "Dinov2Backbone",
    "Dinov2ForImageClassification",
    "Dinov2Model",
    "Dinov2PreTrainedModel",
    "Dinov2WithRegistersBackbone",
    "Dinov2WithRegistersForImageClassification",
    "Dinov2WithRegistersModel",
]

_ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "relu": nn.ReLU}


class Dinov2PatchEmbeddings(nn.Module):
    def __init__(self, config: Dinov2Config) -> None:
        super().__init__()
        self.num_channels = config.num_channels
        self.patch_size = config.patch_size
        self.num_patches = (config.image_size // config.patch_size) ** 2
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class Dinov2Embeddings(nn.Module):
    """CLS token, patch embeddings, (interpolated) position embeddings, register tokens."""

    def __init__(self, config: Dinov2Config) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.config = config
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden))
        if config.use_mask_token or config.num_register_tokens:
            self.mask_token = nn.Parameter(torch.zeros(1, hidden))
        if config.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, hidden))
        self.patch_embeddings = Dinov2PatchEmbeddings(config)
        self.position_embeddings = nn.Parameter(
            torch.randn(1, self.patch_embeddings.num_patches + 1, hidden)
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self._resize_cache: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def has_mask_token(self) -> bool:
        return hasattr(self, "mask_token")

    def position_table(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, 1 + grid_h * grid_w, D) position embeddings for a patch grid.

        Bicubic resizing (with or without antialias) is linear and separable, so it is two
        small matrices per grid, cached, applied to the live table on every call: the result
        can never be stale, whatever changed the weights (``.data`` writes included), and
        gradients flow as through ``F.interpolate``.
        """
        table = self.position_embeddings
        native = math.isqrt(table.shape[1] - 1)
        if native * native != table.shape[1] - 1:
            raise ValueError(
                f"position_embeddings hold {table.shape[1] - 1} patch positions, not a square grid"
            )
        if (grid_h, grid_w) == (native, native):
            return table
        # The interpolation settings are part of the key: they may change on a live config.
        config = self.config
        key = (grid_h, grid_w, native, table.device, config.interpolate_offset, config.antialias)
        resize = None if torch.compiler.is_compiling() else self._resize_cache.get(key)
        if resize is None:
            resize = (
                self._resize_matrix(grid_h, native, 0),
                self._resize_matrix(grid_w, native, 1),
            )
            if not torch.compiler.is_compiling():
                self._resize_cache[key] = resize
        rows, cols = resize
        grid = table[0, 1:].float().reshape(native, native, -1)
        grid = torch.einsum("ir,rsd,js->ijd", rows, grid, cols).reshape(1, grid_h * grid_w, -1)
        return torch.cat([table[:, :1], grid.to(table.dtype)], dim=1)

    def _resize_matrix(self, size: int, native: int, axis: int) -> torch.Tensor:
        """(size, native) weights of the bicubic resize of one axis, as the model variant does
        it (DESIGN.md §2): resizing one-hot rows gives the matrix column by column."""
        one_hot = torch.eye(native, device=self.position_embeddings.device)
        # Batch = source position, H = the axis resized, W = 2 untouched columns (a width-1
        # probe sends the antialiased kernel down a layout path that gets it wrong).
        probe = one_hot.reshape(native, 1, native, 1).expand(native, 1, native, 2).contiguous()
        offset = self.config.interpolate_offset
        if offset:
            resize = {"scale_factor": ((size + offset) / native, 1.0)}
        else:
            resize = {"size": (size, 2)}
        out = F.interpolate(
            probe, mode="bicubic", align_corners=False, antialias=self.config.antialias, **resize
        )
        if out.shape[2] != size:
            raise ValueError(
                f"resizing {native} positions gave {out.shape[2]} on axis {axis}, expected {size}"
            )
        return out[:, 0, :, 0].T.contiguous()

    def forward(
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch, _, height, width = pixel_values.shape
        weight = self.patch_embeddings.projection.weight
        tokens = self.patch_embeddings(pixel_values.to(weight.dtype))
        if bool_masked_pos is not None:
            mask_token = self.mask_token.to(tokens.dtype).unsqueeze(0)
            tokens = torch.where(bool_masked_pos.unsqueeze(-1), mask_token, tokens)
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        patch = self.config.patch_size
        tokens = tokens + self.position_table(height // patch, width // patch)
        if self.config.num_register_tokens:
            registers = self.register_tokens.expand(batch, -1, -1)
            tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)
        return self.dropout(tokens)


class Dinov2SelfAttention(nn.Module):
    def __init__(self, config: Dinov2Config) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.head_dim
        self.dropout_prob = config.attention_probs_dropout_prob
        self.scaling = self.attention_head_size**-0.5
        self.config = config
        self.query = nn.Linear(hidden, hidden, bias=config.qkv_bias)
        self.key = nn.Linear(hidden, hidden, bias=config.qkv_bias)
        self.value = nn.Linear(hidden, hidden, bias=config.qkv_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        head_scale: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, tokens, hidden = hidden_states.shape
        shape = (batch, tokens, self.num_attention_heads, self.attention_head_size)
        query = self.query(hidden_states).view(shape).transpose(1, 2)
        key = self.key(hidden_states).view(shape).transpose(1, 2)
        value = self.value(hidden_states).view(shape).transpose(1, 2)
        dropout = self.dropout_prob if self.training else 0.0
        probs = None
        if output_attentions or self.config._attn_implementation == "eager":
            probs = (query @ key.transpose(-1, -2) * self.scaling).softmax(dim=-1)
            probs = F.dropout(probs, dropout, training=self.training)
            if head_scale is not None:
                probs = probs * head_scale
            context = probs @ value
        else:
            context = F.scaled_dot_product_attention(
                query, key, value, dropout_p=dropout, scale=self.scaling
            )
            if head_scale is not None:
                context = context * head_scale
        return context.transpose(1, 2).reshape(batch, tokens, hidden), probs


class Dinov2SelfOutput(nn.Module):
    def __init__(self, config: Dinov2Config) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden_states))


class Dinov2Attention(nn.Module):
    def __init__(self, config: Dinov2Config) -> None:
        super().__init__()
        self.attention = Dinov2SelfAttention(config)
        self.output = Dinov2SelfOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        head_scale: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        context, probs = self.attention(hidden_states, head_scale, output_attentions)
        return self.output(context), probs


class Dinov2LayerScale(nn.Module):
    def __init__(self, config: Dinov2Config) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(config.layerscale_value * torch.ones(config.hidden_size))

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return hidden_state * self.lambda1


class Dinov2MLP(nn.Module):
    def __init__(self, config: Dinov2Config) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.ffn_hidden_size)
        self.activation = _ACTIVATIONS[config.hidden_act]()
        self.fc2 = nn.Linear(config.ffn_hidden_size, config.hidden_size)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden_state)))


class Dinov2SwiGLUFFN(nn.Module):
    """SwiGLU with the packed ``[gate | up]`` input projection."""

    def __init__(self, config: Dinov2Config) -> None:
        super().__init__()
        self.weights_in = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size)
        self.weights_out = nn.Linear(config.ffn_hidden_size, config.hidden_size)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        gate, up = self.weights_in(hidden_state).chunk(2, dim=-1)
        return self.weights_out(F.silu(gate) * up)


class Dinov2DropPath(nn.Module):
    """Stochastic depth per sample; identity outside training."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep = 1 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        mask = torch.rand(shape, dtype=hidden_states.dtype, device=hidden_states.device)
        return hidden_states / keep * torch.floor(mask + keep)


class Dinov2Layer(nn.Module):
    """Pre-norm block: ``x + ls1 * attn(norm1(x))``, then ``x + ls2 * mlp(norm2(x))``."""

    def __init__(self, config: Dinov2Config) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Dinov2Attention(config)
        self.layer_scale1 = Dinov2LayerScale(config)
        self.drop_path = (
            Dinov2DropPath(config.drop_path_rate) if config.drop_path_rate > 0 else nn.Identity()
        )
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Dinov2SwiGLUFFN(config) if config.use_swiglu_ffn else Dinov2MLP(config)
        self.layer_scale2 = Dinov2LayerScale(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        head_scale: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, probs = self.attention(self.norm1(hidden_states), head_scale, output_attentions)
        hidden_states = self.drop_path(self.layer_scale1(attended)) + hidden_states
        ffn = self.mlp(self.norm2(hidden_states))
        return self.drop_path(self.layer_scale2(ffn)) + hidden_states, probs


class Dinov2Encoder(nn.Module):
    def __init__(self, config: Dinov2Config) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Dinov2Layer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False
        self.gradient_checkpointing_kwargs: dict[str, Any] = {"use_reentrant": False}

    def forward(
        self,
        hidden_states: torch.Tensor,
        head_mask: list[torch.Tensor | None],
        output_attentions: bool,
        output_hidden_states: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        all_hidden = [hidden_states] if output_hidden_states else None
        all_probs = [] if output_attentions else None
        for layer, head_scale in zip(self.layer, head_mask, strict=True):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden_states, probs = checkpoint(
                    layer,
                    hidden_states,
                    head_scale,
                    output_attentions,
                    **self.gradient_checkpointing_kwargs,
                )
            else:
                hidden_states, probs = layer(hidden_states, head_scale, output_attentions)
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            if all_probs is not None:
                all_probs.append(probs)
        return (
            hidden_states,
            None if all_hidden is None else tuple(all_hidden),
            None if all_probs is None else tuple(all_probs),
        )


class Dinov2PreTrainedModel(nn.Module):
    """Shared machinery: weight init, backend selection, loading and saving."""

    config_class = Dinov2Config
    base_model_prefix = "dinov2"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True

    def __init__(self, config: Dinov2Config) -> None:
        super().__init__()
        if not isinstance(config, Dinov2Config):
            raise TypeError(f"config must be a dinov2_fast.Dinov2Config, got {type(config)}")
        config.validate()  # fields may have been set since the config was built
        if config._attn_implementation is None:
            config._attn_implementation = "dinov2_fast"
        self.config = config
        self.backend = "auto"
        self._input_require_grads_hook: torch.utils.hooks.RemovableHandle | None = None

    # -- set-up -------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter as transformers does (truncated normal, zeros, ones)."""
        for module in self.modules():
            self._init_module(module)

    @torch.no_grad()
    def _init_module(self, module: nn.Module) -> None:
        """Initialise the parameters ``module`` holds itself (its children are separate)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, Dinov2Embeddings):
            nn.init.trunc_normal_(module.position_embeddings, std=std)
            nn.init.trunc_normal_(module.cls_token, std=std)
            if module.has_mask_token:
                nn.init.zeros_(module.mask_token)
            if self.config.num_register_tokens:
                nn.init.zeros_(module.register_tokens)
        elif isinstance(module, Dinov2LayerScale):
            nn.init.constant_(module.lambda1, self.config.layerscale_value)

    def set_backend(self, backend: str) -> Dinov2PreTrainedModel:
        """Choose ``"auto"`` (Triton on CUDA when available), ``"torch"`` or ``"triton"``."""
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.backend = backend
        return self

    def set_plan(self, forced: str | dict[str, str] | None) -> Dinov2PreTrainedModel:
        """Force the fused path's plan (``"unfused"``, ``"fused"``, ``"attention=sdpa:flash,..."``
        or a ``{site: candidate}`` dict; see ``dinov2_fast.plan``); ``None`` goes back to the
        measured plan. Overrides ``DINOV2_FAST_PLAN``."""
        self._dinov2_fast_plan = fused.plan_text(forced)
        return self

    def _fused_backend(self, pixel_values: torch.Tensor, output_attentions: bool) -> str | None:
        """The ops backend of this call's fused forward, or None for the module path."""
        return fused.fused_backend(
            self, pixel_values, output_attentions, self.config._attn_implementation
        )

    def _encode(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None,
        head_scales: list[torch.Tensor | None],
        output_attentions: bool,
        output_hidden_states: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None, str]:
        """Embeddings and blocks: the final LayerNorm of the output, the per-layer outputs,
        the attention probabilities, and the ops backend that ran ("torch" for modules)."""
        backend = self._fused_backend(pixel_values, output_attentions)
        embedded = self.embeddings(pixel_values, bool_masked_pos)
        if backend is None:
            last, hidden_states, attentions = self.encoder(
                embedded, head_scales, output_attentions, output_hidden_states
            )
            return self.layernorm(last), hidden_states, attentions, "torch"
        layers = self.encoder.layer
        with fused.on_device(embedded.device):
            run = fused.executor_for(self, self.config, layers, self.layernorm, embedded, backend)
            normed, hidden_states = fused.run_blocks(
                layers, run, embedded, head_scales, output_hidden_states, self.layernorm
            )
        return normed, hidden_states, None, backend

    # -- transformers' PreTrainedModel API ------------------------------------------------

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Recompute each block in the backward pass (training with gradients only);
        ``gradient_checkpointing_kwargs`` go to ``torch.utils.checkpoint.checkpoint``
        (default ``{"use_reentrant": False}``, as in transformers)."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        for module in self.modules():
            if isinstance(module, Dinov2Encoder):
                module.gradient_checkpointing = True
                module.gradient_checkpointing_kwargs = kwargs

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if isinstance(module, Dinov2Encoder):
                module.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def set_attn_implementation(self, attn_implementation: str) -> None:
        """Choose the attention: ``"eager"`` (explicit softmax, on the PyTorch path),
        ``"sdpa"`` (PyTorch's fused attention, on the PyTorch path) or ``"dinov2_fast"``
        (the fused Triton path where it can run, the default)."""
        self.config._attn_implementation = attn_implementation

    @classmethod
    def can_generate(cls) -> bool:
        """DINOv2 is an encoder: never generates."""
        return False

    @property
    def base_model(self) -> nn.Module:
        """The ``Dinov2Model`` inside a head (the model itself for the others)."""
        return getattr(self, self.base_model_prefix, self)

    def get_input_embeddings(self) -> Dinov2PatchEmbeddings:
        return self._embeddings().patch_embeddings

    def get_output_embeddings(self) -> None:
        """No output embeddings: DINOv2 has no language-model head."""
        return None

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The number of parameters (those that require grad with ``only_trainable``).
        ``exclude_embeddings`` drops ``nn.Embedding`` weights, as in transformers; DINOv2
        has none, so the count is the same."""
        return sum(
            p.numel()
            for module in self.modules()
            if not (exclude_embeddings and isinstance(module, nn.Embedding))
            for p in module.parameters(recurse=False)
            if p.requires_grad or not only_trainable
        )

    def enable_input_require_grads(self) -> None:
        """Make the patch embeddings' output require grad, so gradients reach adapters
        (peft) through frozen layers and reentrant gradient checkpointing."""

        def require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            output.requires_grad_(True)

        self.disable_input_require_grads()
        hook = self.get_input_embeddings().register_forward_hook(require_grad)
        self._input_require_grads_hook = hook

    def disable_input_require_grads(self) -> None:
        if self._input_require_grads_hook is not None:
            self._input_require_grads_hook.remove()
            self._input_require_grads_hook = None

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ) -> Any:
        """Upload ``save_pretrained``'s folder to a hub repository (created if missing);
        needs ``huggingface_hub``. Returns the hub's commit info."""
        try:
            from huggingface_hub import HfApi
        except ImportError as err:
            raise ImportError(
                "push_to_hub needs huggingface_hub: pip install huggingface_hub"
            ) from err
        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return api.upload_folder(
                repo_id=repo.repo_id,
                folder_path=folder,
                commit_message=commit_message or f"Upload {type(self).__name__}",
                revision=revision,
                create_pr=create_pr,
            )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- inputs -------------------------------------------------------------------------

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values)}")
        if pixel_values.dim() != 4:
            raise ValueError(
                "pixel_values must be 4-D (batch, channels, height, width), got shape "
                f"{tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a floating tensor, got {pixel_values.dtype}")
        channels, height, width = pixel_values.shape[1:]
        if channels != self.config.num_channels:
            raise ValueError(
                f"pixel_values has {channels} channels; this model expects "
                f"{self.config.num_channels} (config.num_channels)"
            )
        patch = self.config.patch_size
        if height < patch or width < patch:
            raise ValueError(
                f"pixel_values is {height}x{width}, smaller than one {patch}x{patch} patch"
            )

    def _check_masked_pos(
        self, bool_masked_pos: torch.Tensor | None, pixel_values: torch.Tensor
    ) -> None:
        if bool_masked_pos is None:
            return
        if not isinstance(bool_masked_pos, torch.Tensor):
            raise TypeError(
                "bool_masked_pos must be a torch.Tensor of dtype bool, shape (batch, patches), "
                f"got {type(bool_masked_pos).__name__}"
            )
        if not self._embeddings().has_mask_token:
            raise ValueError("bool_masked_pos needs a mask token, but config.use_mask_token=False")
        patch = self.config.patch_size
        batch, _, height, width = pixel_values.shape
        expected = (batch, (height // patch) * (width // patch))
        if bool_masked_pos.dtype != torch.bool or tuple(bool_masked_pos.shape) != expected:
            raise ValueError(
                f"bool_masked_pos must be a bool tensor of shape {expected} (batch, patches), got "
                f"{bool_masked_pos.dtype} {tuple(bool_masked_pos.shape)}"
            )

    def _output_flags(
        self,
        output_attentions: bool | None,
        output_hidden_states: bool | None,
        return_dict: bool | None,
    ) -> tuple[bool, bool, bool]:
        """The call's output switches, ``None`` meaning the config's default (transformers)."""
        config = self.config
        return (
            config.output_attentions if output_attentions is None else bool(output_attentions),
            config.output_hidden_states
            if output_hidden_states is None
            else bool(output_hidden_states),
            config.return_dict if return_dict is None else bool(return_dict),
        )

    def _head_scales(self, head_mask: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Per-layer (1, H, 1, 1) multipliers from a (H,) or (layers, H) head_mask."""
        layers, heads = self.config.num_hidden_layers, self.config.num_attention_heads
        if head_mask is None:
            return [None] * layers
        if not isinstance(head_mask, torch.Tensor):
            raise TypeError(f"head_mask must be a torch.Tensor, got {type(head_mask)}")
        if head_mask.shape == (heads,):
            head_mask = head_mask.expand(layers, heads)
        elif head_mask.shape != (layers, heads):
            raise ValueError(
                f"head_mask must have shape ({heads},) or ({layers}, {heads}) "
                f"(heads or layers x heads), got {tuple(head_mask.shape)}"
            )
        head_mask = head_mask.to(dtype=self.dtype, device=self.device)
        return list(head_mask.reshape(layers, 1, heads, 1, 1).unbind(0))

    def _embeddings(self) -> Dinov2Embeddings:
        return next(m for m in self.modules() if isinstance(m, Dinov2Embeddings))

    # -- loading and saving ---------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None,
        *,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        backend: str = "auto",
        **kwargs: Any,
    ) -> Dinov2PreTrainedModel | tuple[Dinov2PreTrainedModel, dict[str, Any]]:
        """Load a transformers-format folder (or hub id) written by either library.

        ``dtype=None`` keeps the checkpoint's dtype; also a name (``"float16"``) or
        ``"auto"`` (the dtype config.json records). Other keywords are config fields to
        override (e.g. ``num_labels`` for a fresh classifier head, ``out_features`` for a
        backbone) or transformers' loading options: ``config=`` (an object or a path),
        ``state_dict=`` (with ``None`` as the path), ``torch_dtype``, ``device_map`` (one
        device, ``"auto"`` or ``{"": device}``), ``attn_implementation``,
        ``output_loading_info`` (returns ``(model, info)``), ``ignore_mismatched_sizes``,
        the hub's ``cache_dir`` / ``force_download`` / ``local_files_only`` / ``revision`` /
        ``token`` / ``subfolder``, and ``low_cpu_mem_usage`` (a no-op, as in transformers 5).
        Options for quantisation, multi-device placement or other formats are refused.
        """
        from .loading import load_pretrained

        return load_pretrained(
            cls,
            pretrained_model_name_or_path,
            dtype=dtype,
            device=device,
            backend=backend,
            **kwargs,
        )

    @classmethod
    def from_original(
        cls,
        path_or_state_dict: str | os.PathLike | dict[str, torch.Tensor],
        *,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        backend: str = "auto",
        **config_overrides: Any,
    ) -> Dinov2PreTrainedModel:
        """Load an original facebookresearch/dinov2 checkpoint (hub ``.pth`` or training).

        Sizes, registers and the FFN type are read from the tensors; the heads are assumed
        to be 64 wide, as in every released model (override with ``num_attention_heads``).
        """
        from .loading import load_original

        return load_original(
            cls,
            path_or_state_dict,
            dtype=dtype,
            device=device,
            backend=backend,
            **config_overrides,
        )

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write config.json and model.safetensors that transformers 5.17 loads as is."""
        from .loading import save_pretrained

        save_pretrained(self, path)


class Dinov2Model(Dinov2PreTrainedModel):
    """The DINOv2 ViT: embeddings, encoder and final LayerNorm."""

    def __init__(self, config: Dinov2Config) -> None:
        super().__init__(config)
        self.embeddings = Dinov2Embeddings(config)
        self.encoder = Dinov2Encoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.init_weights()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple[torch.Tensor, ...]:
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        output_attentions, output_hidden_states, return_dict = self._output_flags(
            output_attentions, output_hidden_states, return_dict
        )
        if packed.is_image_list(pixel_values):
            # Images of their own sizes: per-image outputs as tuples, pooled ones stacked.
            packed.check_images(
                pixel_values, bool_masked_pos, self.config, self.embeddings.has_mask_token
            )
            sequence, hidden_states, attentions, _ = packed.encode_images(
                self,
                pixel_values,
                bool_masked_pos,
                self._head_scales(head_mask),
                output_attentions,
                output_hidden_states,
            )
            pooled = torch.stack([tokens[0] for tokens in sequence])
        else:
            self._check_pixel_values(pixel_values)
            self._check_masked_pos(bool_masked_pos, pixel_values)
            sequence, hidden_states, attentions, _ = self._encode(
                pixel_values,
                bool_masked_pos,
                self._head_scales(head_mask),
                output_attentions,
                output_hidden_states,
            )
            pooled = sequence[:, 0]
        out = BaseModelOutputWithPooling(
            last_hidden_state=sequence,
            pooler_output=pooled,
            hidden_states=hidden_states,
            attentions=attentions,
        )
        return out if return_dict else out.to_tuple()


class Dinov2ForImageClassification(Dinov2PreTrainedModel):
    """DINOv2 with a linear head on ``[CLS, mean of patch tokens]`` (registers excluded)."""

    def __init__(self, config: Dinov2Config) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.dinov2 = Dinov2Model(config)
        self.classifier = (
            nn.Linear(2 * config.hidden_size, config.num_labels)
            if config.num_labels > 0
            else nn.Identity()
        )
        self.init_weights()

    def set_backend(self, backend: str) -> Dinov2ForImageClassification:
        super().set_backend(backend)
        self.dinov2.set_backend(backend)
        return self

    def set_plan(self, forced: str | dict[str, str] | None) -> Dinov2ForImageClassification:
        super().set_plan(forced)
        self.dinov2.set_plan(forced)
        return self

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutput | tuple[torch.Tensor, ...]:
        output_attentions, output_hidden_states, return_dict = self._output_flags(
            output_attentions, output_hidden_states, return_dict
        )
        outputs = self.dinov2(
            pixel_values,
            head_mask=head_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        first_patch = 1 + self.config.num_register_tokens
        sequence = outputs.last_hidden_state
        if isinstance(sequence, tuple):  # a list of images: one (tokens, D) per image
            cls = torch.stack([tokens[0] for tokens in sequence])
            patch_mean = torch.stack([tokens[first_patch:].mean(dim=0) for tokens in sequence])
        else:
            cls, patch_mean = sequence[:, 0], sequence[:, first_patch:].mean(dim=1)
        logits = self.classifier(torch.cat([cls, patch_mean], dim=1))
        loss = None if labels is None else self._loss(logits, labels)
        out = ImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return out if return_dict else out.to_tuple()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Regression, single- or multi-label loss, chosen as transformers chooses."""
        config = self.config
        labels = labels.to(logits.device)
        if config.problem_type is None:
            if config.num_labels == 1:
                config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                config.problem_type = "single_label_classification"
            else:
                config.problem_type = "multi_label_classification"
        if config.problem_type == "regression":
            if config.num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze())
            return F.mse_loss(logits, labels)
        if config.problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels)


class BackboneType(str, enum.Enum):
    """transformers' backbone kinds, by value (``"transformers"``, ``"timm"``)."""

    TIMM = "timm"
    TRANSFORMERS = "transformers"


class Dinov2Backbone(Dinov2PreTrainedModel):
    """Feature maps of the stages named by ``config.out_features`` (``stem`` = embeddings).

    ``out_features`` and ``out_indices`` are the config's, kept aligned as transformers keeps
    them: setting either (here or on the config) recomputes the other.
    """

    backbone_type = BackboneType.TRANSFORMERS
    has_attentions = True

    def __init__(self, config: Dinov2Config) -> None:
        super().__init__(config)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.embeddings = Dinov2Embeddings(config)
        self.encoder = Dinov2Encoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.init_weights()

    @property
    def stage_names(self) -> list[str]:
        return self.config.stage_names

    @property
    def out_features(self) -> list[str]:
        return self.config.out_features

    @out_features.setter
    def out_features(self, out_features: list[str] | None) -> None:
        self.config.out_features = out_features

    @property
    def out_indices(self) -> list[int]:
        return self.config.out_indices

    @out_indices.setter
    def out_indices(self, out_indices: list[int] | None) -> None:
        self.config.out_indices = out_indices

    @property
    def out_feature_channels(self) -> dict[str, int]:
        """Channels of every stage, selected or not (transformers' ``out_feature_channels``)."""
        return dict(zip(self.stage_names, self.num_features, strict=True))

    @property
    def channels(self) -> list[int]:
        channels = self.out_feature_channels
        return [channels[name] for name in self.out_features]

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> BackboneOutput | tuple[torch.Tensor, ...]:
        output_attentions, output_hidden_states, return_dict = self._output_flags(
            output_attentions, output_hidden_states, return_dict
        )
        patch = self.config.patch_size
        images = packed.is_image_list(pixel_values)
        if images:
            packed.check_images(pixel_values, None, self.config, self.embeddings.has_mask_token)
            last_normed, hidden_states, attentions, backend = packed.encode_images(
                self, pixel_values, None, self._head_scales(None), output_attentions, True
            )
            grids = [(image.shape[1] // patch, image.shape[2] // patch) for image in pixel_values]
        else:
            self._check_pixel_values(pixel_values)
            last_normed, hidden_states, attentions, backend = self._encode(
                pixel_values, None, self._head_scales(None), output_attentions, True
            )
            grids = [(pixel_values.shape[2] // patch, pixel_values.shape[3] // patch)]
        feature_maps = []
        for index, (stage, state) in enumerate(zip(self.stage_names, hidden_states, strict=True)):
            if stage not in self.out_features:
                continue
            last = last_normed if index == len(hidden_states) - 1 else None
            if images:
                # Per image: a (D, h_i, w_i) map of its own grid.
                feature_maps.append(
                    tuple(
                        self._feature_map(s[None], None if last is None else last[i][None], grid,
                                          backend)[0]
                        for i, (s, grid) in enumerate(zip(state, grids, strict=True))
                    )
                )  # fmt: skip
            else:
                feature_maps.append(self._feature_map(state, last, grids[0], backend))
        out = BackboneOutput(
            feature_maps=tuple(feature_maps),
            hidden_states=hidden_states if output_hidden_states else None,
            attentions=attentions,
        )
        return out if return_dict else out.to_tuple()

    def _feature_map(
        self,
        state: torch.Tensor,
        last_normed: torch.Tensor | None,
        grid: tuple[int, int],
        backend: str,
    ) -> torch.Tensor:
        """One stage's (B, N, D) hidden state as its feature map: normed (the last stage's
        norm came fused with the last block, ``last_normed``), then (B, D, h, w) patches."""
        if self.config.apply_layernorm:
            if last_normed is not None:
                state = last_normed
            else:
                norm = self.layernorm
                with ops.use_backend(backend):
                    state = ops.layer_norm(state, norm.weight, norm.bias, norm.eps)
        if self.config.reshape_hidden_states:
            first_patch = 1 + self.config.num_register_tokens
            state = state[:, first_patch:].reshape(state.shape[0], *grid, -1)
            state = state.permute(0, 3, 1, 2).contiguous()
        return state


class Dinov2WithRegistersModel(Dinov2Model):
    """``Dinov2Model`` under transformers' registers name (registers are a config field)."""


class Dinov2WithRegistersForImageClassification(Dinov2ForImageClassification):
    """``Dinov2ForImageClassification`` under transformers' registers name."""


class Dinov2WithRegistersBackbone(Dinov2Backbone):
    """``Dinov2Backbone`` under transformers' registers name."""
