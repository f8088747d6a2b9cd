"""The embedding run: image files to one features ``.npy`` and a manifest, resumable, sharded.

Inputs come from ``sources`` (files, folders, globs, in row order), pixels from
``preprocess`` through ``engine``, and rows go to ``sinks``. Files that cannot be read get no
row; the manifest lists them with the reason.

While a run is going, its work lives in ``FEATURES.partial/`` beside the output: one row of
features per input (``features.npy``), one status byte per input (``status.npy``), the run's
settings and inputs (``run.json``) and the skipped files' reasons (``skipped-RANK.jsonl``).
A batch's features are stored before its status bytes, through shared memory maps whose
writes outlive a killed process, so an interrupted run leaves only finished rows marked done
and ``--resume`` continues from them (after a machine crash, start over with ``--overwrite``).
Under torchrun every rank writes its own rows of those files (so all ranks run on one
machine), and rank 0 compacts them into the output at the end.

The finish commits by writing ``finished.json`` (the manifest, and which file holds the
features) into the partial folder; moving the features to ``--out`` and writing the
manifest follow, and the next run on that ``--out`` completes them if they were cut short.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .._resolve import (
    POOLS,
    UserError,
    check_image_size,
    dtype_name,
    first_line,
    load_model,
    model_identity,
    resolve_device,
    resolve_dtype,
)
from .engine import ImageRows, collate, feature_shape, pool_output
from .preprocess import resize_size_for
from .ranks import Ranks
from .sinks import check_space, copy_rows, create_array, write_json
from .sources import collect_inputs

__all__ = ["EmbedResult", "embed_images", "manifest_path"]

_PENDING, _DONE, _SKIPPED = 0, 1, 2


@dataclass(frozen=True)
class EmbedResult:
    """Where the features and manifest went, rows written, inputs skipped. With no row
    written, neither file was touched and the run stays in ``partial`` for ``--resume``."""

    features: Path
    manifest: Path
    partial: Path
    rows: int
    skipped: int


def manifest_path(features: str | os.PathLike) -> Path:
    """``FEATURES.npy`` -> ``FEATURES.manifest.json``."""
    return Path(features).with_suffix(".manifest.json")


def _partial_dir(features: Path) -> Path:
    return features.with_suffix(".partial")


# -- run state ------------------------------------------------------------------------------

_FINISHED = "finished.json"


def _partial_state(partial: Path) -> str | None:
    """``finished`` (committed, being moved into place), ``unfinished``, ``broken`` or None."""
    if (partial / _FINISHED).is_file():
        return "finished"
    if all((partial / name).is_file() for name in ("run.json", "features.npy", "status.npy")):
        return "unfinished"
    return "broken" if partial.exists() else None


def _complete_finish(out: Path) -> bool:
    """Move a committed run's features and manifest into place (idempotent); True if one was."""
    partial = _partial_dir(out)
    if _partial_state(partial) != "finished":
        return False
    finished = json.loads((partial / _FINISHED).read_text())
    ready = partial / finished["features_file"]
    if ready.exists():
        os.replace(ready, out)
    write_json(manifest_path(out), finished["manifest"])
    shutil.rmtree(partial)
    return True


def _check_out(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Before the model loads (rank 0): --out can be written, and nothing is lost silently."""
    if _complete_finish(out):
        print(f"completed the interrupted finish of {out}", file=sys.stderr)
    try:
        if out.is_dir():
            raise OSError(errno.EISDIR, "it is a folder")
        for folder in (out.parent, *out.parent.parents):
            if folder.exists() and not folder.is_dir():
                raise OSError(errno.ENOTDIR, f"{folder} is not a folder")
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as err:
        reason = err.strerror or first_line(err)
        if err.filename:
            reason += f": {err.filename}"
        raise UserError(f"cannot write --out {out}: {reason}") from None
    if resume or overwrite:
        return
    partial = _partial_dir(out)
    if _partial_state(partial) == "unfinished":
        raise UserError(
            f"an unfinished run is in {partial}: rerun with --resume to continue it, "
            "or --overwrite to start over"
        )
    for existing in (out, manifest_path(out)):
        if existing.exists():
            raise UserError(
                f"{existing} already exists: add --resume to keep its rows and embed only new "
                "inputs, or --overwrite to replace it"
            )


@dataclass(frozen=True)
class _Previous:
    """Rows an earlier run of the same settings has written, by input path."""

    inputs: list[str]
    features: np.ndarray
    done: np.ndarray
    unfinished: bool


def _check_settings(out: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if old.get(key) != value:
            raise UserError(
                f"cannot --resume {out}: it was written with {key}={old.get(key)!r}, this run "
                f"has {value!r} (rerun with --overwrite, or write to another --out)"
            )


def _previous_run(out: Path, settings: dict[str, Any]) -> _Previous | None:
    partial = _partial_dir(out)
    if _partial_state(partial) == "unfinished":
        run = json.loads((partial / "run.json").read_text())
        _check_settings(out, run["settings"], settings)
        status = np.load(partial / "status.npy", mmap_mode="r")
        features = np.load(partial / "features.npy", mmap_mode="r")
        return _Previous(run["inputs"], features, status == _DONE, unfinished=True)
    manifest = manifest_path(out)
    if manifest.is_file() and out.is_file():
        written = json.loads(manifest.read_text())
        _check_settings(out, written, settings)
        features = np.load(out, mmap_mode="r")
        if features.shape[0] == len(written["inputs"]):
            done = np.ones(len(written["inputs"]), dtype=bool)
            return _Previous(written["inputs"], features, done, unfinished=False)
        print(f"{manifest} does not describe {out}: starting over", file=sys.stderr)
    return None


def _start_partial(
    folder: Path, inputs: list[str], settings: dict[str, Any], previous: _Previous | None
) -> None:
    shape = (len(inputs), *settings["feature_shape"])
    row_bytes = np.dtype(settings["features_dtype"]).itemsize * int(np.prod(shape[1:]))
    # The rows plus one status byte each; a run that skips files later needs room for a
    # compacted copy too, checked when it finishes.
    what = f"{len(inputs)} rows of features"
    check_space(folder.parent, len(inputs) * (row_bytes + 1), what)
    folder.mkdir(parents=True)
    write_json(folder / "run.json", {"settings": settings, "inputs": inputs})
    features = create_array(folder / "features.npy", settings["features_dtype"], shape, what)
    status = create_array(folder / "status.npy", np.uint8, (len(inputs),), what)
    if previous is not None:
        old_row = {p: r for r, p in enumerate(previous.inputs) if previous.done[r]}
        new_rows = np.array([r for r, p in enumerate(inputs) if p in old_row], dtype=np.int64)
        old_rows = np.array([old_row[inputs[r]] for r in new_rows], dtype=np.int64)
        copy_rows(previous.features, old_rows, features, new_rows)
        status[new_rows] = _DONE
    features.flush()
    status.flush()


def _prepare(out: Path, inputs: list[str], settings: dict[str, Any], resume: bool) -> np.ndarray:
    """Set up the partial run (rank 0); returns the rows still to embed."""
    partial = _partial_dir(out)
    previous = _previous_run(out, settings) if resume else None
    if previous is not None and previous.unfinished and previous.inputs == inputs:
        # Same inputs as the interrupted run: continue in place, retrying skipped files.
        status = np.load(partial / "status.npy", mmap_mode="r+")
        status[status == _SKIPPED] = _PENDING
        status.flush()
        for log in partial.glob("skipped-*.jsonl"):
            log.unlink()
    else:
        if _partial_state(partial) == "unfinished" and not resume:
            print(f"discarding the unfinished run in {partial} (--overwrite)", file=sys.stderr)
        staging = partial.with_name(partial.name + ".new")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            _start_partial(staging, inputs, settings, previous)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        del previous  # its memory maps read files about to be replaced
        shutil.rmtree(partial, ignore_errors=True)
        staging.rename(partial)
        status = np.load(partial / "status.npy", mmap_mode="r")
    pending = np.flatnonzero(status == _PENDING)
    if resume:
        done = len(inputs) - len(pending)
        print(f"resuming: {done} of {len(inputs)} rows already written", file=sys.stderr)
    return pending


def _embed_rows(
    model: torch.nn.Module,
    partial: Path,
    inputs: list[str],
    rows: np.ndarray,
    *,
    pool: str,
    crop_size: int,
    batch_size: int,
    workers: int,
    show_progress: bool,
    rank: int,
) -> None:
    features = np.load(partial / "features.npy", mmap_mode="r+")
    status = np.load(partial / "status.npy", mmap_mode="r+")
    features_dtype = getattr(torch, str(features.dtype))
    prefix_tokens = 1 + model.config.num_register_tokens
    loader = DataLoader(
        ImageRows(inputs, rows, crop_size),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=model.device.type == "cuda",
    )
    progress = tqdm(
        total=len(rows), unit="img", desc="embed", file=sys.stderr, disable=not show_progress
    )
    with open(partial / f"skipped-{rank}.jsonl", "a") as log, progress, torch.inference_mode():
        for read_rows, pixels, failed in loader:
            for row, reason in failed:
                tqdm.write(f"skipped {inputs[row]}: {reason}", file=sys.stderr)
                log.write(json.dumps({"row": row, "reason": reason}) + "\n")
            if failed:
                log.flush()
            if read_rows:
                pixels = pixels.to(device=model.device, dtype=model.dtype, non_blocking=True)
                pooled = pool_output(model(pixel_values=pixels), pool, prefix_tokens)
                features[read_rows] = pooled.to(features_dtype).cpu().numpy()
            status[read_rows] = _DONE
            status[[row for row, _ in failed]] = _SKIPPED
            progress.update(len(read_rows) + len(failed))
    features.flush()
    status.flush()


def _finish(out: Path) -> EmbedResult:
    """Compact the partial run into the output and write the manifest (rank 0).

    Crash-safe: writing ``finished.json`` commits; what follows, ``_complete_finish`` redoes.
    """
    partial = _partial_dir(out)
    run = json.loads((partial / "run.json").read_text())
    inputs, settings = run["inputs"], run["settings"]
    status = np.load(partial / "status.npy")
    if (status == _PENDING).any():
        raise UserError(f"{np.count_nonzero(status == _PENDING)} rows were never written")
    written = np.flatnonzero(status == _DONE)
    skipped_rows = np.flatnonzero(status == _SKIPPED)
    result = EmbedResult(out, manifest_path(out), partial, len(written), len(skipped_rows))
    if not len(written):
        # Nothing to show for the run: an earlier --out and its manifest stay as they were.
        return result
    reasons = {}
    for log in sorted(partial.glob("skipped-*.jsonl")):
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            reasons[entry["row"]] = entry["reason"]
    ready = "features.npy"
    if len(written) < len(inputs):
        ready = "compact.npy"
        features = np.load(partial / "features.npy", mmap_mode="r")
        shape = (len(written), *features.shape[1:])
        what = f"the {len(written)} rows read (free some, then rerun with --resume)"
        check_space(partial.parent, features[:1].nbytes * len(written), what)
        compact = create_array(partial / ready, features.dtype, shape, what)
        copy_rows(features, written, compact, np.arange(len(written)))
        compact.flush()
        del compact, features
    manifest = {
        "features": out.name,
        "shape": [len(written), *settings["feature_shape"]],
        **settings,
        "inputs": [inputs[r] for r in written],
        "skipped": [{"path": inputs[r], "reason": reasons.get(int(r), "?")} for r in skipped_rows],
    }
    write_json(partial / _FINISHED, {"features_file": ready, "manifest": manifest})
    _complete_finish(out)
    return result


def _default_workers(device: torch.device) -> int:
    # On the CPU the model, not decoding, is the bottleneck and wants the cores. On a GPU,
    # decoding is: every core but the one feeding the GPU decodes, shared among the ranks.
    if device.type != "cuda":
        return 1
    per_process = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(16, per_process - 1))


def embed_images(
    patterns: Sequence[str],
    model: str,
    out: str | os.PathLike,
    *,
    pool: str = "cls",
    crop_size: int = 224,
    batch_size: int = 64,
    dtype: str = "auto",
    device: str = "auto",
    workers: int | None = None,
    backend: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
) -> EmbedResult:
    """Embed images to ``out`` (``.npy``) and its manifest; see the module docstring.

    An existing ``out`` (or its manifest, or an unfinished run) is an error unless ``resume``
    keeps its rows or ``overwrite`` replaces it. Under torchrun every rank calls this with
    the same arguments and gets the same result.
    """
    out = Path(out)
    if out.suffix.lower() != ".npy":
        raise UserError(f"--out must name a .npy file, got {out}")
    if pool not in POOLS:
        raise UserError(f"--pool must be one of {', '.join(POOLS)}, got {pool}")
    if resume and overwrite:
        raise UserError("--resume keeps the earlier rows and --overwrite drops them: pick one")
    ranks = Ranks.from_env()
    try:

        def check() -> list[str]:
            _check_out(out, resume=resume, overwrite=overwrite)
            return collect_inputs(patterns)

        inputs = ranks.on_rank0(check)
        torch_device = resolve_device(device, ranks.local_rank)
        if torch_device.type == "cuda":
            # Pinned host memory and stray allocations follow the current device, not cuda:0.
            torch.cuda.set_device(torch_device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        net = load_model(model, dtype=torch_dtype, device=torch_device, backend=backend)
        config = net.config
        check_image_size(crop_size, config.patch_size, "--size")
        settings = {
            "model": model_identity(model),
            "pool": pool,
            "crop_size": crop_size,
            "resize_size": resize_size_for(crop_size),
            "model_dtype": dtype_name(torch_dtype),
            # numpy has no bfloat16: those features are stored as float32.
            "features_dtype": "float16" if torch_dtype == torch.float16 else "float32",
            "feature_shape": feature_shape(pool, config.hidden_size, config.patch_size, crop_size),
        }
        pending = ranks.on_rank0(lambda: _prepare(out, inputs, settings, resume))
        _embed_rows(
            net,
            _partial_dir(out),
            inputs,
            np.array_split(pending, ranks.world)[ranks.rank],
            pool=pool,
            crop_size=crop_size,
            batch_size=batch_size,
            workers=_default_workers(torch_device) if workers is None else workers,
            show_progress=show_progress and ranks.rank == 0,
            rank=ranks.rank,
        )
        ranks.barrier()
        return ranks.on_rank0(lambda: _finish(out))
    finally:
        ranks.close()
