"""Checkpoint reading and writing: transformers folders, hub ids and original .pth files.

Every load is strict: missing, unexpected or mis-shaped tensors raise with the keys named
(an original checkpoint's in its own names). The tolerated gaps are a classifier head absent
from a backbone checkpoint (the usual fine-tuning start) and, with
``ignore_mismatched_sizes=True``, tensors whose shapes differ from the model's: both are
initialised fresh with a warning naming their keys.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import _CONFIG_NAME, _MODEL_TYPES, Dinov2Config

_SAFETENSORS = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_TORCH_BIN = "pytorch_model.bin"
_TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
_WEIGHT_FILES = (_SAFETENSORS, _SAFETENSORS_INDEX, _TORCH_BIN, _TORCH_BIN_INDEX)

_BODY_PREFIXES = ("dinov2.", "dinov2_with_registers.")
_HEAD_PREFIX = "classifier."

# transformers >= 5.18 names the projections q/k/v/o_proj and splits the SwiGLU input
# projection into gate/up in memory; map them onto the on-disk names this library uses.
_RENAMES = (
    (re.compile(r"\.attention\.(?:attention\.)?q_proj\."), ".attention.attention.query."),
    (re.compile(r"\.attention\.(?:attention\.)?k_proj\."), ".attention.attention.key."),
    (re.compile(r"\.attention\.(?:attention\.)?v_proj\."), ".attention.attention.value."),
    (re.compile(r"\.attention\.(?:output\.)?o_proj\."), ".attention.output.dense."),
    (re.compile(r"\.mlp\.down_proj\."), ".mlp.weights_out."),
)
_GATE_UP = re.compile(r"^(.*\.mlp\.)(gate|up)_proj\.(weight|bias)$")

# transformers' from_pretrained options that mean something this library does not do
# (quantisation, multi-device placement, other file formats, remote code): refused by name.
_UNSUPPORTED_OPTIONS = frozenset(
    {
        "quantization_config",
        "max_memory",
        "offload_folder",
        "offload_buffers",
        "tp_plan",
        "tp_size",
        "device_mesh",
        "distributed_config",
        "gguf_file",
        "variant",
        "use_safetensors",
        "key_mapping",
        "adapter_kwargs",
        "adapter_name",
        "proxies",
        "trust_remote_code",
        "weights_only",
        "use_kernels",
        "generation_config",
    }
)
_SUPPORTED_OPTIONS = (
    "config, state_dict, dtype (torch_dtype), device, device_map, backend, attn_implementation, "
    "output_loading_info, ignore_mismatched_sizes, low_cpu_mem_usage, cache_dir, "
    "force_download, local_files_only, revision, token, subfolder, and config fields"
)


# -- reading files ------------------------------------------------------------------------


def _resolve_folder(path: str | os.PathLike, subfolder: str, hub_options: dict[str, Any]) -> Path:
    """A local checkpoint folder, or a hub id fetched with ``hub_options`` (transformers'
    cache_dir, force_download, local_files_only, revision, token; unused for local folders,
    as in transformers)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        folder = folder / subfolder
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {path} has no subfolder {subfolder!r}")
        return folder
    if folder.exists():
        raise ValueError(f"{folder} is a file; from_pretrained expects a checkpoint folder")
    name = str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", ""):
        raise FileNotFoundError(f"checkpoint folder {name!r} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise FileNotFoundError(
            f"{name!r} is not a local folder, and huggingface_hub (needed to fetch it from the "
            "hub) is not installed: pip install huggingface_hub, or pass a local folder"
        ) from err
    try:
        # safetensors first; the .bin weights only for repositories that have nothing else.
        prefix = f"{subfolder.strip('/')}/" if subfolder else ""
        folder = (
            Path(
                snapshot_download(
                    name,
                    allow_patterns=[f"{prefix}*.json", f"{prefix}*.safetensors"],
                    **hub_options,
                )
            )
            / subfolder
        )
        if not any(folder.glob("*.safetensors")):
            folder = (
                Path(
                    snapshot_download(
                        name, allow_patterns=[f"{prefix}*.json", f"{prefix}*.bin"], **hub_options
                    )
                )
                / subfolder
            )
    except Exception as err:  # the hub client raises many types; one clear message serves all
        raise FileNotFoundError(
            f"{name!r} is not a local folder and could not be fetched from the hub: {err}"
        ) from err
    return folder


def _read_file(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            return load_file(str(file))
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint file {file}: {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"{file} holds a {type(state).__name__}, not a state dict")
    return state


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a transformers folder: single file or sharded, safetensors or bin."""
    for name in _WEIGHT_FILES:
        file = folder / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return _read_file(file)
        index = json.loads(file.read_text())
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            shard_file = folder / shard
            if not shard_file.is_file():
                raise FileNotFoundError(f"{file} names shard {shard}, which is missing")
            state.update(_read_file(shard_file))
        missing = sorted(set(index["weight_map"]) - set(state))
        if missing:
            raise ValueError(f"shards of {folder} lack tensors listed in the index: {missing[:8]}")
        return state
    raise FileNotFoundError(f"no weights in {folder}: expected one of {', '.join(_WEIGHT_FILES)}")


# -- key mapping --------------------------------------------------------------------------


def _legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename transformers >= 5.18 in-memory keys to the on-disk layout."""
    out: dict[str, torch.Tensor] = {}
    gate_up: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _GATE_UP.match(key)
        if match:
            prefix, part, kind = match.groups()
            gate_up.setdefault((prefix, kind), {})[part] = tensor
            continue
        for pattern, replacement in _RENAMES:
            key = pattern.sub(replacement, key)
        out[key] = tensor
    for (prefix, kind), parts in gate_up.items():
        if set(parts) != {"gate", "up"}:
            raise ValueError(f"{prefix}{kind}: found only the {sorted(parts)} projection")
        out[f"{prefix}weights_in.{kind}"] = torch.cat([parts["gate"], parts["up"]], dim=0)
    return out


def _split_body_and_head(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    body, head = {}, {}
    for key, tensor in state.items():
        if key.startswith(_HEAD_PREFIX):
            head[key] = tensor
            continue
        for prefix in _BODY_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        body[key] = tensor
    return body, head


def _load_into(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    *,
    ignore_mismatched_sizes: bool = False,
    file_name: Callable[[str], str] = lambda key: key,
) -> dict[str, Any]:
    """Strictly load ``state`` (transformers key layout) into ``model`` built on meta.

    ``file_name`` turns a model key into the name the user's file gives it, for errors.
    Returns transformers' loading info: missing (freshly initialised head), unexpected
    (ignored head) and mismatched (freshly initialised, ``ignore_mismatched_sizes``) keys.
    """
    body, head = _split_body_and_head(_legacy_names(state))
    expected = model.state_dict()
    has_head = any(k.startswith(_HEAD_PREFIX) for k in expected)
    prefix = "dinov2." if any(k.startswith("dinov2.") for k in expected) else ""
    wanted = {prefix + k: v for k, v in body.items()}
    fresh_head: list[str] = []
    if has_head:
        if head:
            wanted.update(head)
        else:
            fresh_head = sorted(k for k in expected if k.startswith(_HEAD_PREFIX))
    elif head:
        warnings.warn(
            f"{source}: ignoring the classifier head ({sorted(head)}), which "
            f"{type(model).__name__} does not have",
            stacklevel=4,
        )
    mismatched = {
        (k, tuple(wanted[k].shape), tuple(expected[k].shape))
        for k in set(wanted) & set(expected)
        if wanted[k].shape != expected[k].shape
    }
    reinitialised = {key for key, *_ in mismatched} if ignore_mismatched_sizes else set()
    for key in reinitialised:
        del wanted[key]
    missing = set(expected) - set(wanted) - set(fresh_head) - reinitialised
    unexpected = set(wanted) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing tensors {_file_names(missing, prefix, file_name)}")
    if unexpected:
        problems.append(f"unexpected tensors {_file_names(unexpected, prefix, file_name)}")
    if mismatched and not ignore_mismatched_sizes:
        problems.append(
            "mis-shaped tensors "
            + "; ".join(
                f"{_file_names([k], prefix, file_name)[0]}: checkpoint {ours}, model {theirs}"
                for k, ours, theirs in sorted(mismatched)
            )
        )
    if problems:
        raise ValueError(
            f"{source} does not match {type(model).__name__} with this config: "
            + ", ".join(problems)
        )
    model.load_state_dict(wanted, strict=False, assign=True)
    fresh = sorted(set(expected) - set(wanted))
    if fresh:
        _initialise_fresh(model, fresh, next(iter(body.values())).dtype)
    if fresh_head:
        warnings.warn(
            f"{source} has no classifier head; {fresh_head} are newly initialised: "
            "train them before use",
            stacklevel=4,
        )
    if reinitialised:
        warnings.warn(
            f"{source}: tensors of other shapes were not loaded and are newly initialised "
            f"(ignore_mismatched_sizes=True): {sorted(mismatched)}",
            stacklevel=4,
        )
    return {
        "missing_keys": set(fresh_head),
        "unexpected_keys": set(head) if not has_head else set(),
        "mismatched_keys": mismatched if ignore_mismatched_sizes else set(),
        "error_msgs": [],
    }


def _file_names(keys: Iterable[str], prefix: str, file_name: Callable[[str], str]) -> list[str]:
    """Model keys as the checkpoint names them, with the model's name where they differ."""
    names = set()
    for key in keys:
        name = file_name(key.removeprefix(prefix))
        names.add(name if name == key.removeprefix(prefix) else f"{name} (model: {key})")
    return sorted(names)


def _initialise_fresh(model: torch.nn.Module, keys: list[str], dtype: torch.dtype) -> None:
    """Materialise and initialise, as the model's own init does, the parameters ``keys``
    that were left on meta; parameters of the same modules that were loaded are kept."""
    for owner in sorted({key.rpartition(".")[0] for key in keys}):
        module = model.get_submodule(owner)
        loaded = {n: p for n, p in module.named_parameters(recurse=False) if not p.is_meta}
        module.to_empty(device="cpu", recurse=False)
        model._init_module(module)
        for name, param in module.named_parameters(recurse=False):
            if name in loaded:
                setattr(module, name, loaded[name])
            else:
                param.data = param.data.to(dtype)


def _resolve_dtype(
    dtype: torch.dtype | str | None, torch_dtype: torch.dtype | str | None
) -> torch.dtype | str | None:
    """A torch floating dtype, ``"auto"`` or ``None``; names such as ``"float16"`` and
    transformers' older ``torch_dtype=`` spelling are accepted."""
    if torch_dtype is not None:
        if dtype is not None and dtype != torch_dtype:
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one")
        dtype = torch_dtype
    accepted = "a floating torch.dtype, its name ('float32', 'float16', 'bfloat16') or 'auto'"
    if dtype is None or dtype == "auto":
        return dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not accepted; expected {accepted}")
    return dtype


def _resolve_device(
    device: str | torch.device | None, device_map: str | int | torch.device | dict | None
) -> torch.device | None:
    """One device from ``device=`` or transformers' ``device_map=`` (a device, ``"auto"``
    = the accelerator if there is one, else the CPU, or ``{"": device}``)."""
    if device_map is None:
        return None if device is None else torch.device(device)
    accepted = "a device ('cuda:0', 0, torch.device), 'auto' or {'': device}"
    if isinstance(device_map, dict):
        if len(set(device_map.values())) != 1:
            raise ValueError(
                f"device_map={device_map!r} splits the model across devices, which dinov2_fast "
                f"does not do; expected {accepted}"
            )
        device_map = next(iter(device_map.values()))
    if device_map == "auto":
        mapped = torch.accelerator.current_accelerator() or torch.device("cpu")
    else:
        try:
            mapped = torch.device(device_map)
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"device_map={device_map!r} is not accepted; expected {accepted}"
            ) from err
    if device is not None and torch.device(device) != mapped:
        raise ValueError(f"device={device!r} and device_map={device_map!r} disagree; pass one")
    return mapped


def _finish(
    model: torch.nn.Module,
    dtype: torch.dtype | None,
    device: torch.device | None,
    backend: str,
) -> torch.nn.Module:
    model.to(device=device, dtype=dtype)
    model.set_backend(backend)
    return model.eval()


def _build_on_meta(cls: type, config: Dinov2Config) -> torch.nn.Module:
    with torch.device("meta"):
        return cls(config)


def _check_options(config_overrides: dict[str, Any]) -> None:
    refused = sorted(set(config_overrides) & _UNSUPPORTED_OPTIONS)
    if refused:
        raise ValueError(
            f"from_pretrained option(s) {refused} are not supported by dinov2_fast; supported: "
            f"{_SUPPORTED_OPTIONS}"
        )


def _given_config(
    config: Any, attn_implementation: str | None, config_overrides: dict[str, Any]
) -> Dinov2Config | None:
    """``config=`` as a Dinov2Config copy with the overrides applied: ours, transformers'
    DINOv2 config, or a path to a config.json (or its folder); None when not given."""
    if config is None:
        return None
    if isinstance(config, (str, os.PathLike)):
        built = Dinov2Config.from_pretrained(config, **config_overrides)
    elif isinstance(config, Dinov2Config) or getattr(config, "model_type", None) in _MODEL_TYPES:
        built = Dinov2Config.from_dict(config.to_dict(), **config_overrides)
        attn_implementation = attn_implementation or _known_attn(config)
    else:
        raise TypeError(
            "config must be a dinov2_fast.Dinov2Config, a transformers DINOv2 config or a path "
            f"to a config.json, got {type(config).__name__}"
        )
    if attn_implementation is not None:
        built._attn_implementation = attn_implementation
    return built


def _known_attn(config: Any) -> str | None:
    """A given config's attention choice where it is one of ours (transformers' default
    ``sdpa`` included); other names are transformers-only and left to our default."""
    attn = getattr(config, "_attn_implementation", None)
    return attn if attn in ("eager", "sdpa", "dinov2_fast") else None


def load_pretrained(
    cls: type,
    path: str | os.PathLike | None,
    *,
    config: Any = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    device_map: str | int | torch.device | dict | None = None,
    backend: str = "auto",
    attn_implementation: str | None = None,
    output_loading_info: bool = False,
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool | None = None,  # no-op: always loaded without a second copy
    offload_state_dict: bool | None = None,  # no-op, as in transformers 5
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    subfolder: str = "",
    **config_overrides: Any,
) -> torch.nn.Module | tuple[torch.nn.Module, dict[str, Any]]:
    _check_options(config_overrides)
    dtype = _resolve_dtype(dtype, torch_dtype)
    target = _resolve_device(device, device_map)
    built = _given_config(config, attn_implementation, config_overrides)
    if state_dict is not None:
        if path is not None:
            raise ValueError("pass a checkpoint path or state_dict=, not both")
        if built is None:
            raise ValueError("from_pretrained(None, state_dict=...) also needs config=")
        source, state, recorded_dtype = "the given state_dict", dict(state_dict), None
    elif path is None:
        raise ValueError(
            "from_pretrained(None) needs config= and state_dict= (for random weights, build the "
            "model from its config: Dinov2Model(config))"
        )
    else:
        hub_options = {
            "cache_dir": cache_dir,
            "force_download": force_download,
            "local_files_only": local_files_only,
            "revision": revision,
            "token": token,
        }
        folder = _resolve_folder(path, subfolder, hub_options)
        if built is None:
            built = Dinov2Config.from_pretrained(folder, **config_overrides)
            if attn_implementation is not None:
                built._attn_implementation = attn_implementation
        source, state = str(folder), read_state_dict(folder)
        recorded_dtype = _recorded_dtype(folder)
    if dtype == "auto":
        dtype = recorded_dtype
    model = _build_on_meta(cls, built)
    info = _load_into(model, state, source, ignore_mismatched_sizes=ignore_mismatched_sizes)
    model = _finish(model, dtype, target, backend)
    return (model, info) if output_loading_info else model


def _recorded_dtype(folder: Path) -> torch.dtype | None:
    """The dtype config.json records (transformers writes ``dtype``, older ``torch_dtype``),
    which ``dtype="auto"`` loads in; None keeps the tensors' own dtypes."""
    file = folder / _CONFIG_NAME
    config = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    name = config.get("dtype") or config.get("torch_dtype")
    try:
        return _resolve_dtype(name, None) if isinstance(name, str) and name != "auto" else None
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from err


# -- original facebookresearch checkpoints -----------------------------------------------


def _unwrap_original(state: Any) -> dict[str, torch.Tensor]:
    for wrapper in ("teacher", "model", "state_dict"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("original checkpoint is not a dict of tensors (or one under 'teacher')")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    # block_chunks layouts nest blocks as blocks.<chunk>.<global index>.
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}


_ORIGINAL_GLOBALS = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "mask_token": "embeddings.mask_token",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_ORIGINAL_BLOCK = {
    "norm1": "norm1",
    "attn.proj": "attention.output.dense",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.w12": "mlp.weights_in",
    "mlp.w3": "mlp.weights_out",
    "ls2.gamma": "layer_scale2.lambda1",
}


def _original_config(state: dict[str, torch.Tensor], overrides: dict[str, Any]) -> Dinov2Config:
    try:
        hidden = state["cls_token"].shape[-1]
        patch = state["patch_embed.proj.weight"].shape[-1]
        positions = state["pos_embed"].shape[1] - 1
    except KeyError as err:
        raise ValueError(f"original checkpoint lacks {err.args[0]!r}; is it a DINOv2 ViT?") from err
    layers = 1 + max(
        (int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1
    )
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    swiglu = "blocks.0.mlp.w12.weight" in state
    if swiglu:
        ffn = state["blocks.0.mlp.w3.weight"].shape[1]
        mlp_ratio = 4 if (int(hidden * 4 * 2 / 3) + 7) // 8 * 8 == ffn else ffn * 1.5 / hidden
    else:
        ffn = state["blocks.0.mlp.fc1.weight"].shape[0] if layers else 4 * hidden
        mlp_ratio = ffn / hidden if ffn % hidden else ffn // hidden
    fields: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64,
        "mlp_ratio": mlp_ratio,
        "image_size": round(positions**0.5) * patch,
        "patch_size": patch,
        "num_channels": state["patch_embed.proj.weight"].shape[1],
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "use_swiglu_ffn": swiglu,
        "use_mask_token": "mask_token" in state,
        "num_register_tokens": registers,
        # The released register models resize by size with antialias; the others use the
        # +0.1 scale-factor trick without antialias (DESIGN.md §2).
        "interpolate_offset": 0.0 if registers else 0.1,
        "interpolate_antialias": bool(registers),
    }
    config = Dinov2Config.from_dict(fields, **overrides)
    if config.ffn_hidden_size != ffn:
        raise ValueError(f"cannot infer mlp_ratio: FFN width {ffn} from hidden {hidden}")
    return config


def _original_to_transformers(
    state: dict[str, torch.Tensor], config: Dinov2Config
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unknown = []
    hidden = config.hidden_size
    for key, tensor in state.items():
        if key in _ORIGINAL_GLOBALS:
            out[_ORIGINAL_GLOBALS[key]] = tensor
            continue
        match = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", key)
        if match is None:
            unknown.append(key)
            continue
        index, name, kind = match.groups()
        prefix = f"encoder.layer.{index}."
        if name == "attn.qkv":
            for part, chunk in zip(("query", "key", "value"), tensor.split(hidden), strict=True):
                out[f"{prefix}attention.attention.{part}.{kind}"] = chunk
        elif kind == "gamma" and f"{name}.gamma" in _ORIGINAL_BLOCK:
            out[prefix + _ORIGINAL_BLOCK[f"{name}.gamma"]] = tensor
        elif name in _ORIGINAL_BLOCK:
            out[f"{prefix}{_ORIGINAL_BLOCK[name]}.{kind}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"original checkpoint has tensors this model cannot place: {unknown[:8]}")
    # Checkpoints trained without LayerScale (init_values=None) are LayerScale of ones.
    for index in range(config.num_hidden_layers):
        for scale in ("layer_scale1", "layer_scale2"):
            out.setdefault(
                f"encoder.layer.{index}.{scale}.lambda1",
                torch.ones(hidden, dtype=state["cls_token"].dtype),
            )
    return out


_GLOBALS_BY_MODEL_KEY = {v: k for k, v in _ORIGINAL_GLOBALS.items()}
_BLOCK_BY_MODEL_NAME = {v: k for k, v in _ORIGINAL_BLOCK.items()}


def _original_name(key: str) -> str:
    """The original checkpoint's name for a (transformers-layout) model key."""
    if key in _GLOBALS_BY_MODEL_KEY:
        return _GLOBALS_BY_MODEL_KEY[key]
    match = re.match(r"encoder\.layer\.(\d+)\.(.+)$", key)
    if match is None:
        return key
    index, name = match.groups()
    if name in _BLOCK_BY_MODEL_NAME:  # LayerScale: a bare parameter, no weight/bias suffix
        return f"blocks.{index}.{_BLOCK_BY_MODEL_NAME[name]}"
    module, _, kind = name.rpartition(".")
    if module in (
        "attention.attention.query",
        "attention.attention.key",
        "attention.attention.value",
    ):
        return f"blocks.{index}.attn.qkv.{kind}"  # q, k and v are one packed tensor there
    if module in _BLOCK_BY_MODEL_NAME:
        return f"blocks.{index}.{_BLOCK_BY_MODEL_NAME[module]}.{kind}"
    return key


def load_original(
    cls: type,
    path_or_state_dict: str | os.PathLike | dict[str, torch.Tensor],
    *,
    dtype: torch.dtype | str | None,
    device: str | torch.device | None,
    backend: str,
    **config_overrides: Any,
) -> torch.nn.Module:
    if isinstance(path_or_state_dict, dict):
        source = "original state dict"
        # The model takes ownership of the tensors it loads: copy the caller's.
        state = {k: v.clone() for k, v in _unwrap_original(path_or_state_dict).items()}
    else:
        file = Path(path_or_state_dict).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"original checkpoint {file} does not exist")
        source, state = str(file), _unwrap_original(_read_file(file))
    dtype = _resolve_dtype(dtype, None)
    config = _original_config(state, config_overrides)
    model = _build_on_meta(cls, config)
    _load_into(model, _original_to_transformers(state, config), source, file_name=_original_name)
    return _finish(
        model, None if dtype == "auto" else dtype, _resolve_device(device, None), backend
    )


# -- saving -------------------------------------------------------------------------------


def save_pretrained(model: torch.nn.Module, path: str | os.PathLike) -> None:
    config: Dinov2Config = model.config
    if config.interpolate_offset:
        warnings.warn(
            f"interpolate_offset={config.interpolate_offset} (the original hub models' position "
            "resize) is not a transformers setting: transformers will resize positions by "
            "size and give different outputs at non-native image sizes; dinov2_fast reads it back",
            stacklevel=3,
        )
    folder = Path(path)
    registers = config.num_register_tokens > 0
    name = type(model).__name__.replace("Dinov2WithRegisters", "Dinov2")
    if registers:
        name = name.replace("Dinov2", "Dinov2WithRegisters", 1)
    state = {}
    for key, tensor in model.state_dict().items():
        if registers and key.startswith("dinov2."):
            key = "dinov2_with_registers." + key[len("dinov2.") :]
        # A copy: q/k/v weights share one storage (packed_qkv), which safetensors refuses.
        state[key] = tensor.detach().to("cpu", copy=True).contiguous()
    config.save_pretrained(folder, architecture=name)
    save_file(state, str(folder / _SAFETENSORS), metadata={"format": "pt"})
