"""``Dinov2Config``: transformers' DINOv2 configuration, without depending on transformers."""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ATTN_IMPLEMENTATIONS", "Dinov2Config", "Dinov2WithRegistersConfig"]

_CONFIG_NAME = "config.json"
_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
_ACTIVATIONS = ("gelu", "silu", "swish", "relu")
_PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

# "eager": explicit softmax(QK^T)V on the PyTorch path (returns probabilities);
# "sdpa": the PyTorch path with F.scaled_dot_product_attention, never the fused kernels;
# "dinov2_fast": the fused Triton path wherever it can run, else as "sdpa" (the default).
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "dinov2_fast")

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
        "_commit_hash",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
    }
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_at_least(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_int(v) and v >= low), f"an int >= {low}"


def _number(check: Callable[[float], bool], accepted: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_number(v) and check(v)), accepted


_BOOL = (lambda v: isinstance(v, bool), "true or false")
_SQUARE = (lambda v: _is_int(v) and v >= 1, "a single int >= 1 (square images and patches)")

# Every scalar field: (accepts the value, what is accepted), for one-line errors at
# construction and at load (a config.json with "64" or null fails here, not deep in a forward).
_SCALAR_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "hidden_size": _int_at_least(1),
    "num_hidden_layers": _int_at_least(0),
    "num_attention_heads": _int_at_least(1),
    "mlp_ratio": _number(lambda v: v > 0, "a number > 0"),
    "hidden_act": (lambda v: v in _ACTIVATIONS, f"one of {_ACTIVATIONS}"),
    "hidden_dropout_prob": _number(lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "attention_probs_dropout_prob": _number(lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "initializer_range": _number(lambda v: v >= 0, "a number >= 0"),
    "layer_norm_eps": _number(lambda v: v > 0, "a number > 0"),
    "image_size": _SQUARE,
    "patch_size": _SQUARE,
    "num_channels": _int_at_least(1),
    "qkv_bias": _BOOL,
    "layerscale_value": _number(lambda v: True, "a finite number"),
    "drop_path_rate": _number(lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "use_swiglu_ffn": _BOOL,
    "apply_layernorm": _BOOL,
    "reshape_hidden_states": _BOOL,
    "use_mask_token": _BOOL,
    "num_register_tokens": _int_at_least(0),
    "interpolate_offset": _number(lambda v: v >= 0, "a number >= 0"),
    "interpolate_antialias": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
    "output_hidden_states": _BOOL,
    "output_attentions": _BOOL,
    "return_dict": _BOOL,
    "problem_type": (lambda v: v is None or v in _PROBLEM_TYPES, f"null or {_PROBLEM_TYPES}"),
}


def _refuse(field: str, value: Any, accepted: str) -> ValueError:
    return ValueError(f"Dinov2Config: {field}={value!r} is not accepted; expected {accepted}")


class Dinov2Config:
    """Configuration of a DINOv2 ViT, field for field transformers' ``Dinov2Config``.

    Extra fields: ``num_register_tokens`` (0 for plain DINOv2) and the position-embedding
    interpolation variant (DESIGN.md §2): ``interpolate_offset`` (0.0 = transformers' size-based
    resize; 0.1 = the original hub models' ``scale_factor=(n + 0.1) / sqrt(N)``) and
    ``interpolate_antialias`` (``None`` = antialias exactly when the model has registers, as
    transformers does).

    As in transformers, ``out_features`` and ``out_indices`` stay aligned (setting one
    recomputes the other), ``output_hidden_states`` / ``output_attentions`` / ``return_dict``
    are the defaults of a forward call that passes ``None``, and ``attn_implementation``
    (read back as ``_attn_implementation``) picks the attention: one of
    ``ATTN_IMPLEMENTATIONS``. Every field is checked at construction and by ``validate()``.
    """

    model_type = "dinov2"
    # transformers' pipeline() reads this; a config not fetched from the hub has none.
    _commit_hash: str | None = None

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
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        return_dict: bool = True,
        attn_implementation: str | None = None,
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
        self.output_hidden_states = output_hidden_states
        self.output_attentions = output_attentions
        self.return_dict = return_dict
        self._attn_implementation = attn_implementation
        self._out_features, self._out_indices = out_features, out_indices
        self._set_labels(num_labels, id2label, label2id)
        self.validate()
        for key, value in kwargs.items():
            if key not in _IGNORED_KEYS:
                setattr(self, key, value)

    # -- labels -------------------------------------------------------------------------

    def _set_labels(
        self,
        num_labels: int | None,
        id2label: dict[int, str] | None,
        label2id: dict[str, int] | None,
    ) -> None:
        if num_labels is not None and not (_is_int(num_labels) and num_labels >= 0):
            raise _refuse("num_labels", num_labels, "an int >= 0")
        for name, mapping in (("id2label", id2label), ("label2id", label2id)):
            if mapping is not None and not isinstance(mapping, dict):
                raise _refuse(name, mapping, "a dict (or null)")
        if id2label is not None:
            try:
                id2label = {int(k): v for k, v in id2label.items()}
            except (TypeError, ValueError) as err:
                raise _refuse("id2label", id2label, "a dict keyed by label ids (ints)") from err
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

    # -- derived values ---------------------------------------------------------------------

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

    @property
    def use_return_dict(self) -> bool:
        """transformers' older name for ``return_dict``."""
        return self.return_dict

    @property
    def _attn_implementation(self) -> str | None:
        """The attention implementation (``None`` until a model resolves the default)."""
        return self._attn_implementation_internal

    @_attn_implementation.setter
    def _attn_implementation(self, value: str | None) -> None:
        if value is not None and value not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation={value!r} is not supported; use one of {ATTN_IMPLEMENTATIONS}"
            )
        self._attn_implementation_internal = value

    # -- validation ---------------------------------------------------------------------

    def _validate_scalars(self) -> None:
        for field, (accepts, accepted) in _SCALAR_FIELDS.items():
            if field == "hidden_act" and self.use_swiglu_ffn is True:
                continue  # the SwiGLU FFN has no configurable activation
            value = getattr(self, field)
            if not accepts(value):
                raise _refuse(field, value, accepted)

    def validate(self) -> None:
        """Check every field's type and range and their consistency; raise a one-line
        ``ValueError`` naming the field, its value and what is accepted. Models call it
        when built, so a field set after construction is checked too."""
        self._validate_scalars()
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"Dinov2Config: hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.image_size < self.patch_size:
            raise ValueError(
                f"Dinov2Config: image_size={self.image_size} is smaller than "
                f"patch_size={self.patch_size}"
            )
        if self.ffn_hidden_size < 1:
            raise _refuse("mlp_ratio", self.mlp_ratio, "a ratio that gives an FFN width >= 1")
        if self.problem_type == "single_label_classification" and self.num_labels == 1:
            raise ValueError(
                "Dinov2Config: problem_type='single_label_classification' needs num_labels > 1 "
                "(use num_labels=2, or problem_type='regression')"
            )
        self._attn_implementation = self._attn_implementation
        self.set_output_features_output_indices(self._out_features, self._out_indices)

    # -- backbone stages (transformers' BackboneConfigMixin behaviour) -----------------------

    @property
    def stage_names(self) -> list[str]:
        return ["stem"] + [f"stage{i}" for i in range(1, self.num_hidden_layers + 1)]

    @property
    def out_features(self) -> list[str]:
        return self._out_features

    @out_features.setter
    def out_features(self, out_features: list[str] | None) -> None:
        self.set_output_features_output_indices(out_features, None)

    @property
    def out_indices(self) -> list[int]:
        return self._out_indices

    @out_indices.setter
    def out_indices(self, out_indices: list[int] | tuple[int, ...] | None) -> None:
        self.set_output_features_output_indices(None, out_indices)

    def set_output_features_output_indices(
        self,
        out_features: list[str] | None,
        out_indices: list[int] | tuple[int, ...] | None,
    ) -> None:
        """Select the backbone's stages by name, by index or both (they must agree); the
        other is computed; neither selects the last stage."""
        names = self.stage_names
        if out_features is not None:
            if not isinstance(out_features, list) or not all(
                isinstance(f, str) for f in out_features
            ):
                raise _refuse("out_features", out_features, f"a list of stage names from {names}")
            bad_names = [f for f in out_features if f not in names]
            if bad_names:
                raise ValueError(f"out_features {bad_names} are not stages; choose from {names}")
        if out_indices is not None:
            if not isinstance(out_indices, (list, tuple)) or not all(
                _is_int(i) for i in out_indices
            ):
                raise _refuse("out_indices", out_indices, "a list of ints")
            bad = [i for i in out_indices if not -len(names) <= i < len(names)]
            if bad:
                raise ValueError(f"out_indices {bad} are out of range for stages {names}")
            out_indices = list(out_indices)
        if out_features is None and out_indices is None:
            out_features, out_indices = [names[-1]], [len(names) - 1]
        elif out_features is None:
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
        self._out_features, self._out_indices = list(out_features), out_indices

    # -- construction and serialisation ------------------------------------------------------

    @classmethod
    def for_size(cls, name: str, **overrides: Any) -> Dinov2Config:
        """The configuration of a released DINOv2 size: small, base, large or giant (patch 14)."""
        if name not in _SIZES:
            raise ValueError(f"unknown DINOv2 size {name!r}; choose from {sorted(_SIZES)}")
        return cls(**{"image_size": 518, **_SIZES[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict in transformers' config.json layout."""
        out = {k: copy.deepcopy(v) for k, v in vars(self).items() if not k.startswith("_")}
        out["out_features"] = list(self.out_features)
        out["out_indices"] = list(self.out_indices)
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["model_type"] = "dinov2_with_registers" if self.num_register_tokens else "dinov2"
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """``to_dict()`` without the fields that equal the defaults of its ``model_type``
        (kept), as transformers' ``to_json_string()`` writes by default."""
        config = self.to_dict()
        defaults = Dinov2Config.from_dict({"model_type": config["model_type"]}).to_dict()
        return {k: v for k, v in config.items() if k == "model_type" or defaults.get(k) != v}

    def to_json_string(self, use_diff: bool = True) -> str:
        """The config as JSON; ``use_diff=True`` writes only the fields that differ from the
        defaults (what loads back is the same config either way)."""
        config = self.to_diff_dict() if use_diff else self.to_dict()
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        """Write ``to_json_string(use_diff)`` to a file."""
        Path(json_file_path).write_text(self.to_json_string(use_diff), encoding="utf-8")

    @classmethod
    def from_dict(cls, config: dict[str, Any], **overrides: Any) -> Dinov2Config:
        """A config from a config.json dict; ``overrides`` replace fields (a new stage
        selection or label count replaces the saved one as a whole)."""
        if not isinstance(config, dict):
            raise ValueError(
                f"a DINOv2 config must be a JSON object (a dict), got {type(config).__name__}"
            )
        unknown = sorted(set(overrides) - _FIELDS)
        if unknown:
            raise TypeError(
                f"{unknown} are not Dinov2Config fields (see Dinov2PreTrainedModel.from_pretrained "
                "for the loading options)"
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
    def from_json_file(cls, json_file: str | os.PathLike) -> Dinov2Config:
        """A config from a config.json file."""
        file = Path(json_file)
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not valid JSON: {err}") from err
        return cls.from_dict(config)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> Dinov2Config:
        """Read ``config.json`` from a folder (or the file itself); see ``from_dict``."""
        path = Path(path)
        file = path / _CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no {_CONFIG_NAME} at {path}")
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not valid JSON: {err}") from err
        if not isinstance(config, dict):
            raise ValueError(f"{file} holds a JSON {type(config).__name__}, not a config object")
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
