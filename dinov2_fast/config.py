"""``Dinov2Config``: transformers' DINOv2 configuration, without depending on transformers."""

from __future__ import annotations

import copy
import inspect
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["Dinov2Config", "Dinov2WithRegistersConfig"]

_CONFIG_NAME = "config.json"
_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
_ACTIVATIONS = ("gelu", "silu", "swish", "relu")

# The released DINOv2 sizes (DESIGN.md §2); "giant" is the SwiGLU ViT-g/14.
_SIZES: dict[str, dict[str, Any]] = {
    "small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
    "giant": {
        "hidden_size": 1536,
        "num_hidden_layers": 40,
        "num_attention_heads": 24,
        "use_swiglu_ffn": True,
    },
}

# Keys transformers writes that carry no information for us; accepted and not stored.
_IGNORED_KEYS = frozenset(
    {
        "architectures",
        "transformers_version",
        "stage_names",
        "dtype",
        "torch_dtype",
        "_name_or_path",
    }
)


class Dinov2Config:
    """Configuration of a DINOv2 ViT, field for field transformers' ``Dinov2Config``.

    Extra fields: ``num_register_tokens`` (0 for plain DINOv2) and the position-embedding
    interpolation variant (DESIGN.md §2): ``interpolate_offset`` (0.0 = transformers' size-based
    resize; 0.1 = the original hub models' ``scale_factor=(n + 0.1) / sqrt(N)``) and
    ``interpolate_antialias`` (``None`` = antialias exactly when the model has registers, as
    transformers does).
    """

    model_type = "dinov2"

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        mlp_ratio: float = 4,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-6,
        image_size: int = 224,
        patch_size: int = 14,
        num_channels: int = 3,
        qkv_bias: bool = True,
        layerscale_value: float = 1.0,
        drop_path_rate: float = 0.0,
        use_swiglu_ffn: bool = False,
        out_features: list[str] | None = None,
        out_indices: list[int] | None = None,
        apply_layernorm: bool = True,
        reshape_hidden_states: bool = True,
        use_mask_token: bool = True,
        num_register_tokens: int = 0,
        interpolate_offset: float = 0.0,
        interpolate_antialias: bool | None = None,
        num_labels: int | None = None,
        id2label: dict[int, str] | None = None,
        label2id: dict[str, int] | None = None,
        problem_type: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.qkv_bias = qkv_bias
        self.layerscale_value = layerscale_value
        self.drop_path_rate = drop_path_rate
        self.use_swiglu_ffn = use_swiglu_ffn
        self.apply_layernorm = apply_layernorm
        self.reshape_hidden_states = reshape_hidden_states
        self.use_mask_token = use_mask_token
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        self.problem_type = problem_type
        self._set_labels(num_labels, id2label, label2id)
        self._validate()
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, num_hidden_layers + 1)]
        self.out_features, self.out_indices = self._resolve_stages(out_features, out_indices)
        for key, value in kwargs.items():
            if key not in _IGNORED_KEYS:
                setattr(self, key, value)

    def _set_labels(
        self,
        num_labels: int | None,
        id2label: dict[int, str] | None,
        label2id: dict[str, int] | None,
    ) -> None:
        if id2label is not None:
            id2label = {int(k): v for k, v in id2label.items()}
            if num_labels is not None and num_labels != len(id2label):
                raise ValueError(
                    f"num_labels={num_labels} disagrees with id2label, which has "
                    f"{len(id2label)} entries"
                )
        else:
            id2label = {i: f"LABEL_{i}" for i in range(2 if num_labels is None else num_labels)}
        self.id2label = id2label
        self.label2id = label2id if label2id is not None else {v: k for k, v in id2label.items()}

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, value: int) -> None:
        self._set_labels(value, None, None)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def antialias(self) -> bool:
        """Whether position-embedding interpolation antialiases (resolves ``None``)."""
        if self.interpolate_antialias is None:
            return self.num_register_tokens > 0
        return self.interpolate_antialias

    @property
    def ffn_hidden_size(self) -> int:
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.use_swiglu_ffn:
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    def _validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if not isinstance(self.patch_size, int) or not isinstance(self.image_size, int):
            raise ValueError(
                "image_size and patch_size must be single ints (square images and patches), got "
                f"image_size={self.image_size!r}, patch_size={self.patch_size!r}"
            )
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size={self.image_size} is smaller than patch_size")
        if not self.use_swiglu_ffn and self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not supported; use one of {_ACTIVATIONS}"
            )
        if self.num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {self.num_register_tokens}")
        if self.problem_type not in (
            None,
            "regression",
            "single_label_classification",
            "multi_label_classification",
        ):
            raise ValueError(f"problem_type={self.problem_type!r} is not a known problem type")

    def _resolve_stages(
        self, out_features: list[str] | None, out_indices: list[int] | None
    ) -> tuple[list[str], list[int]]:
        names = self.stage_names
        if out_features is None and out_indices is None:
            return [names[-1]], [len(names) - 1]
        if out_indices is not None:
            bad = [i for i in out_indices if not -len(names) <= i < len(names)]
            if bad:
                raise ValueError(f"out_indices {bad} are out of range for stages {names}")
        if out_features is not None:
            bad_names = [f for f in out_features if f not in names]
            if bad_names:
                raise ValueError(f"out_features {bad_names} are not stages; choose from {names}")
        if out_features is None:
            out_features = [names[i] for i in out_indices]
        elif out_indices is None:
            out_indices = [names.index(f) for f in out_features]
        elif [names[i] for i in out_indices] != list(out_features):
            raise ValueError(
                f"out_features={out_features} and out_indices={out_indices} name different stages"
            )
        positions = [names.index(f) for f in out_features]
        if positions != sorted(set(positions)):
            # Feature maps come out in stage order, one per stage, as in transformers.
            raise ValueError(
                f"out_features {list(out_features)} must name distinct stages in the order "
                f"of {names}"
            )
        return list(out_features), list(out_indices)

    @classmethod
    def for_size(cls, name: str, **overrides: Any) -> Dinov2Config:
        """The configuration of a released DINOv2 size: small, base, large or giant (patch 14)."""
        if name not in _SIZES:
            raise ValueError(f"unknown DINOv2 size {name!r}; choose from {sorted(_SIZES)}")
        return cls(**{"image_size": 518, **_SIZES[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict in transformers' config.json layout."""
        out = {k: copy.deepcopy(v) for k, v in vars(self).items() if not k.startswith("_")}
        out.pop("stage_names")
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["model_type"] = "dinov2_with_registers" if self.num_register_tokens else "dinov2"
        return out

    @classmethod
    def from_dict(cls, config: dict[str, Any], **overrides: Any) -> Dinov2Config:
        """A config from a config.json dict; ``overrides`` replace fields (a new stage
        selection or label count replaces the saved one as a whole)."""
        unknown = sorted(set(overrides) - _FIELDS)
        if unknown:
            raise TypeError(
                f"{unknown} are not Dinov2Config fields (loading options are dtype=, device= "
                "and backend=)"
            )
        config = dict(config)
        if {"out_features", "out_indices"} & set(overrides):
            config.pop("out_features", None)
            config.pop("out_indices", None)
        if "num_labels" in overrides:
            config.pop("id2label", None)
            config.pop("label2id", None)
        config.update(overrides)
        model_type = config.pop("model_type", "dinov2")
        if model_type not in _MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not a DINOv2 config; expected one of {_MODEL_TYPES}"
            )
        if model_type == "dinov2_with_registers":
            # transformers' registers config defaults differ: patch 16 and 4 registers.
            config.setdefault("num_register_tokens", 4)
            config.setdefault("patch_size", 16)
            config.setdefault("use_mask_token", True)
        return cls(**config)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> Dinov2Config:
        """Read ``config.json`` from a folder (or the file itself); see ``from_dict``."""
        path = Path(path)
        file = path / _CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no {_CONFIG_NAME} at {path}")
        try:
            config = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not valid JSON: {err}") from err
        return cls.from_dict(config, **overrides)

    def save_pretrained(self, path: str | os.PathLike, architecture: str | None = None) -> None:
        """Write ``config.json`` into the folder ``path`` (created if missing)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = self.to_dict()
        if architecture is not None:
            config["architectures"] = [architecture]
        (path / _CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dinov2Config) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Dinov2Config {json.dumps(self.to_dict(), indent=2, sort_keys=True)}"


_FIELDS = frozenset(inspect.signature(Dinov2Config.__init__).parameters) - {"self", "kwargs"}


class Dinov2WithRegistersConfig(Dinov2Config):
    """``Dinov2Config`` with transformers' registers defaults: 4 registers, patch 16."""

    model_type = "dinov2_with_registers"

    def __init__(self, patch_size: int = 16, num_register_tokens: int = 4, **kwargs: Any) -> None:
        super().__init__(patch_size=patch_size, num_register_tokens=num_register_tokens, **kwargs)
