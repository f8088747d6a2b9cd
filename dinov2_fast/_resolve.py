"""The CLI's vocabulary: its model, device and dtype arguments turned into objects, with
one-line errors for the ones that name nothing usable."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

from .config import Dinov2Config
from .modeling import Dinov2Model
from .ops import triton_available

SIZES = ("small", "base", "large", "giant")
POOLS = ("cls", "mean", "cls+mean", "patch")
# exact: transformers' pipeline. fast: JPEGs decoded at a reduced scale (libjpeg's DCT-domain
# downscale to the smallest of 1/2, 1/4, 1/8 that stays at least the resize), then the same.
# gpu: JPEGs decoded by nvjpeg through torchvision, where it is installed.
DECODES = ("exact", "fast", "gpu")
# center: the checkpoints' centre crop. none: the whole image at its own aspect ratio, the
# shortest edge resized to --size, each side floored to a patch multiple.
CROPS = ("center", "none")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ORIGINAL_SUFFIXES = (".pth", ".pt")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".json")
# How much of each end of a weights file the fingerprint reads: the header (names, shapes,
# offsets) and enough values at both ends that a same-size rewrite is seen even with an
# unchanged mtime.
_FINGERPRINT_BYTES = 1 << 20


class UserError(Exception):
    """A problem with the user's arguments or files, reported as one line without a traceback."""


class SharedError(UserError):
    """A UserError that every torchrun rank raises together (rank 0's, handed to all): the
    CLI reports it once, from rank 0. Any other error is reported by the rank that met it."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` is CUDA when present; each torchrun process takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (see `dinov2-fast info`)")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on GPUs that have it, float16 on older GPUs, float32 on the CPU."""
    if name != "auto":
        return DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def check_backend(backend: str, device: torch.device) -> None:
    """Refuse ``triton`` up front where its kernels cannot run, rather than at the first batch."""
    if backend == "triton" and not triton_available(device):
        raise UserError(
            f"--backend triton cannot run on {device}: it needs CUDA and triton, or "
            "TRITON_INTERPRET=1 for the slow CPU interpreter (see `dinov2-fast info`)"
        )


def check_image_size(size: int, patch_size: int, option: str) -> None:
    """Refuse an input size that holds no patch, naming the option and its minimum."""
    if size < patch_size:
        raise UserError(
            f"{option} {size} is smaller than the model's {patch_size}px patch: "
            f"use {patch_size} or more (224 by default)"
        )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def quoted(path: str | os.PathLike) -> str:
    """A path for a one-line message: quoted, and a newline or other control character in
    the name escaped so it cannot split the line."""
    return repr(os.fspath(path))


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for one-line reports."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def random_model(size: str, *, seed: int = 0) -> Dinov2Model:
    """A released-size model with random weights, every parameter randomised.

    LayerNorm weights, biases and LayerScale start as ones and zeros, which would hide bugs
    in the ops that read them (DESIGN.md §4), so they get noise too.
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model = Dinov2Model(Dinov2Config.for_size(size))
        for param in model.parameters():
            if param.dim() <= 1:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def model_identity(spec: str) -> str:
    """What a model argument names, stable across working directories (for resume checks)."""
    path = Path(spec)
    return str(path.resolve()) if path.exists() else spec


def _hub_folder(spec: str) -> Path | None:
    """The cached snapshot a hub id was loaded from, without going to the network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, local_files_only=True))
    except Exception:  # not installed, not cached, or a hub client error: nothing to read
        return None


def model_fingerprint(spec: str) -> str:
    """The weights' content, as far as a resume check needs it: a hash over every weights
    and config file's name, size, mtime and first and last MiB. A rewrite of the weights
    changes it; so does touching them (a false alarm that only costs an ``--overwrite``)."""
    path = Path(spec)
    folder = path if path.is_dir() else None if path.is_file() else _hub_folder(spec)
    if folder is not None:
        files = sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    else:
        files = [path] if path.is_file() else []
    digest = hashlib.blake2b(digest_size=16)
    for file in files:
        stat = file.stat()
        digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(_FINGERPRINT_BYTES))
            handle.seek(max(0, stat.st_size - _FINGERPRINT_BYTES))
            digest.update(handle.read(_FINGERPRINT_BYTES))
    return digest.hexdigest() if files else "unknown"


def load_model(
    spec: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    backend: str,
    allow_random_size: bool = False,
) -> Dinov2Model:
    """A local transformers folder, an original ``.pth``, a hub id, or (if allowed) a size name."""
    check_backend(backend, device)
    path = Path(spec)
    if spec in SIZES and path.exists():
        # Which one a bare size name meant would depend on the working folder: ask.
        random = ", or run elsewhere for the random-weight size" if allow_random_size else ""
        raise UserError(
            f"--model {spec} is ambiguous: {quoted(spec)} is also a file or folder here; write "
            f"./{spec} for it, or facebook/dinov2-{spec} for the released weights{random}"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{quoted(spec)} is not a model folder: it has no config.json")
        loader, source = Dinov2Model.from_pretrained, path
    elif path.is_file():
        if path.suffix not in _ORIGINAL_SUFFIXES:
            raise UserError(
                f"{quoted(spec)} is neither a model folder nor an original .pth or .pt checkpoint"
            )
        loader, source = Dinov2Model.from_original, path
    elif spec in SIZES:
        if not allow_random_size:
            raise UserError(
                f"{spec} names a random-weight model for verify and bench; "
                "embed needs trained weights (a model folder, .pth file or hub id)"
            )
        return random_model(spec).to(device=device, dtype=dtype).set_backend(backend)
    elif _HUB_ID.fullmatch(spec):
        loader, source = Dinov2Model.from_pretrained, spec
    else:
        sizes = f", or one of {', '.join(SIZES)}" if allow_random_size else ""
        raise UserError(
            f"model not found: {quoted(spec)} (expected a local model folder, an original .pth "
            f"or .pt file, a hub id such as facebook/dinov2-small{sizes})"
        )
    try:
        return loader(source, dtype=dtype, device=device, backend=backend).eval()
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as err:
        raise UserError(f"cannot load model {quoted(spec)}: {_load_failure(err)}") from err


def _load_failure(err: BaseException) -> str:
    # torch.load's refusal of a file that is not a checkpoint is a paragraph of advice to
    # drop weights_only, which is not what a user with a damaged or wrong file needs.
    text = "\n".join(str(e) for e in (err, err.__cause__) if e is not None)
    if "Weights only load failed" not in text:
        return first_line(err)
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    why = f" ({detail.group(1).strip()})" if detail else ""
    return f"not a PyTorch checkpoint of weights{why}"
