"""The embedding run: image files to one features ``.npy`` (or a folder of Parquet parts) and a
manifest, resumable, sharded across torchrun processes or into ``--num-shards`` runs.

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

The run's rows are written in ``features.npy`` whatever the output format; the finish writes
them in the output's format (``sinks.FORMATS``) inside the partial folder, then commits by
writing ``finished.json`` (the manifest, and which file holds the
features) into the partial folder; moving the features to ``--out`` and writing the
manifest follow, and the next run on that ``--out`` completes them if they were cut short.

Ragged rows (``--pool patch --crop none``: each input its own grid of patches) cannot be rows
of one array: there ``features.npy`` holds, per input, where its patches are (a chunk and
the first patch in it, and the grid), and each batch's patches go whole into a chunk file of
``chunks/`` before the batch's index rows and status bytes (``ragged``). The rest (status,
resume, ranks, the finish's commit) is the same; a resume that starts a new partial folder
copies the chunks its kept rows point into (or a finished output's patches, as one chunk).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .._resolve import (
    POOLS,
    UserError,
    check_image_size,
    dtype_name,
    first_line,
    load_model,
    model_fingerprint,
    model_identity,
    quoted,
    resolve_device,
    resolve_dtype,
)
from . import ragged
from .engine import (
    DEFAULT_BATCH_SIZE,
    StageTimes,
    check_max_tokens,
    feature_shape,
    iter_features,
)
from .lock import RunLock
from .preprocess import check_crop, check_decode, resize_size_for
from .ranks import Ranks
from .sinks import (
    FORMATS,
    NpyRows,
    OutputFormat,
    check_space,
    copy_rows,
    create_array,
    disk_full_names,
    write_json,
)
from .sources import Inputs, collect_inputs, shard_of

__all__ = ["ENGINES", "EmbedResult", "embed_images", "manifest_path"]

# Where a run's work happens: this machine (and its torchrun processes), or a Ray cluster.
ENGINES = ("local", "ray")

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
# What a committed run's finished.json may name, per output format.
_READY_NAMES = {"npy": ("features.npy", "compact.npy"), "parquet": ("parquet",)}


def _partial_state(partial: Path) -> str | None:
    """``finished`` (committed, being moved into place), ``unfinished``, ``broken`` or None."""
    if (partial / _FINISHED).is_file():
        return "finished"
    if all((partial / name).is_file() for name in ("run.json", "features.npy", "status.npy")):
        return "unfinished"
    return "broken" if partial.exists() else None


def _damaged(path: Path, reason: str) -> UserError:
    return UserError(
        f"{quoted(path)} is damaged ({reason}): rerun with --overwrite to start over "
        "(its rows are lost), or move it away to keep it"
    )


def _read_json(path: Path, required: dict[str, type]) -> dict[str, Any]:
    """A run file or manifest, refused as damaged unless it holds the ``required`` fields."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise _damaged(path, first_line(err)) from None
    if not isinstance(value, dict):
        raise _damaged(path, f"a JSON {type(value).__name__}, not an object")
    for key, kind in required.items():
        if not isinstance(value.get(key), kind):
            raise _damaged(path, f"no {kind.__name__} {key!r}")
    return value


def _load_array(path: Path, rows: int, read=lambda path: np.load(path, mmap_mode="r")):
    """A run's features (``read`` from ``path``, by default a memory map of a ``.npy``) with
    one row per input, refused as damaged otherwise."""
    try:
        array = read(path)
    except (OSError, ValueError, EOFError) as err:
        raise _damaged(path, first_line(err)) from None
    if array.ndim == 0 or array.shape[0] != rows:
        raise _damaged(path, f"shape {array.shape}, expected {rows} rows")
    return array


def _complete_finish(out: Path) -> bool:
    """Move a committed run's features and manifest into place (idempotent); True if one was."""
    partial = _partial_dir(out)
    if _partial_state(partial) != "finished":
        return False
    finished = _read_json(partial / _FINISHED, {"features_file": str, "manifest": dict})
    output = FORMATS.get(finished["manifest"].get("format", "npy"))
    if output is None or finished["features_file"] not in _READY_NAMES[output.name]:
        raise _damaged(partial / _FINISHED, f"features_file {finished['features_file']!r}")
    output.place(partial / finished["features_file"], out)
    write_json(manifest_path(out), finished["manifest"])
    shutil.rmtree(partial)
    return True


def _check_writable(out: Path, output: OutputFormat) -> None:
    """Before the model loads (rank 0): --out can be written."""
    try:
        if out.exists() and out.is_dir() != output.is_folder:
            if out.is_dir():
                raise OSError(errno.EISDIR, "it is a folder")
            raise OSError(errno.ENOTDIR, "it is a file, and this format writes a folder")
        for folder in (out.parent, *out.parent.parents):
            if folder.exists() and not folder.is_dir():
                raise OSError(errno.ENOTDIR, f"{quoted(folder)} is not a folder")
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as err:
        reason = err.strerror or first_line(err)
        if err.filename:
            reason += f": {quoted(err.filename)}"
        raise UserError(f"cannot write --out {quoted(out)}: {reason}") from None


def _check_existing(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Before the model loads, under the run's lock (rank 0): nothing is lost silently."""
    try:
        if _complete_finish(out):
            print(f"completed the interrupted finish of {quoted(out)}", file=sys.stderr)
    except UserError:
        # A damaged committed run is what --overwrite is for; _prepare removes it.
        if not overwrite:
            raise
    if resume or overwrite:
        return
    partial = _partial_dir(out)
    if _partial_state(partial) == "unfinished":
        raise UserError(
            f"an unfinished run is in {quoted(partial)}: rerun with --resume to continue it, "
            "or --overwrite to start over"
        )
    for existing in (out, manifest_path(out)):
        if existing.exists():
            raise UserError(
                f"{quoted(existing)} already exists: add --resume to keep its rows and embed "
                "only new inputs, or --overwrite to replace it"
            )


@dataclass(frozen=True)
class _Previous:
    """Rows an earlier run of the same settings has written, by input path."""

    inputs: list[str]
    features: np.ndarray
    done: np.ndarray
    unfinished: bool
    # Ragged rows: the chunks the done rows' index entries point into (files or arrays).
    chunks: dict[int, Path | np.ndarray] | None = None


# What a run written before a setting was recorded had: such runs can still be resumed.
UNRECORDED_SETTINGS = {"crop": "center"}


def _check_settings(out: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if old.get(key, UNRECORDED_SETTINGS.get(key)) == value:
            continue
        fix = "(rerun with --overwrite, or write to another --out)"
        if key == "model_fingerprint":
            raise UserError(
                f"cannot --resume {quoted(out)}: the weights of {quoted(new['model'])} changed "
                f"since its rows were written, and rows of two models cannot share it {fix}"
            )
        raise UserError(
            f"cannot --resume {quoted(out)}: it was written with {key}={old.get(key)!r}, this "
            f"run has {value!r} {fix}"
        )


def _previous_run(out: Path, output: OutputFormat, settings: dict[str, Any]) -> _Previous | None:
    partial = _partial_dir(out)
    if _partial_state(partial) == "unfinished":
        run = _read_json(partial / "run.json", {"settings": dict, "inputs": list})
        _check_settings(out, run["settings"], settings)
        rows = len(run["inputs"])
        status = _load_array(partial / "status.npy", rows)
        features = _load_array(partial / "features.npy", rows)
        done = status == _DONE
        chunks = ragged.done_chunks(partial, features, done) if ragged.is_ragged(settings) else None
        return _Previous(run["inputs"], features, done, unfinished=True, chunks=chunks)
    manifest = manifest_path(out)
    if manifest.is_file() and output.exists(out):
        written = _read_json(manifest, {"inputs": list})
        _check_settings(out, written, settings)
        inputs = written["inputs"]
        done = np.ones(len(inputs), dtype=bool)
        if ragged.is_ragged(settings):
            try:
                index, patches = ragged.read_output(output.name, out, written)
            except (OSError, ValueError, EOFError) as err:
                raise _damaged(out, first_line(err)) from None
            return _Previous(inputs, index, done, unfinished=False, chunks={0: patches})
        shape = settings["feature_shape"]
        features = _load_array(out, len(inputs), lambda out: output.read(out, inputs, shape))
        return _Previous(inputs, features, done, unfinished=False)
    return None


def _check_kept(out: Path, written: Iterable[str], inputs: list[str]) -> None:
    """A resume keeps every row written before (``written``, by path): refuse one that
    would leave some out."""
    given = set(inputs)
    dropped = [p for p in written if p not in given]
    if dropped:
        raise UserError(
            f"cannot --resume {quoted(out)}: {len(dropped)} of its inputs are not among this "
            f"run's, such as {quoted(dropped[0])}: give them again to keep their rows, or "
            "rerun with --overwrite to drop them"
        )


def _start_partial(
    folder: Path, inputs: list[str], settings: dict[str, Any], previous: _Previous | None
) -> None:
    if ragged.is_ragged(settings):
        # Each row's place in the chunks; the patches' size is known once they are decoded.
        dtype, shape = np.int64, (len(inputs), len(ragged.INDEX_FIELDS))
    else:
        dtype, shape = settings["features_dtype"], (len(inputs), *settings["feature_shape"])
    row_bytes = np.dtype(dtype).itemsize * int(np.prod(shape[1:]))
    # The rows plus one status byte each; a run that skips files later needs room for a
    # compacted copy too, checked when it finishes.
    what = f"{len(inputs)} rows of features"
    check_space(folder / "features.npy", len(inputs) * (row_bytes + 1), what)
    folder.mkdir(parents=True)
    write_json(folder / "run.json", {"settings": settings, "inputs": inputs})
    if ragged.is_ragged(settings):
        ragged.copy_chunks({} if previous is None else previous.chunks, folder / "chunks")
    features = create_array(folder / "features.npy", dtype, shape, what)
    status = create_array(folder / "status.npy", np.uint8, (len(inputs),), what)
    if previous is not None:
        old_row = {p: r for r, p in enumerate(previous.inputs) if previous.done[r]}
        new_rows = np.array([r for r, p in enumerate(inputs) if p in old_row], dtype=np.int64)
        old_rows = np.array([old_row[inputs[r]] for r in new_rows], dtype=np.int64)
        copy_rows(previous.features, old_rows, features, new_rows)
        status[new_rows] = _DONE
    features.flush()
    status.flush()


def _prepare(
    out: Path, output: OutputFormat, inputs: list[str], settings: dict[str, Any], resume: bool
) -> np.ndarray:
    """Set up the partial run (rank 0); returns the rows still to embed."""
    partial = _partial_dir(out)
    previous = _previous_run(out, output, settings) if resume else None
    if previous is not None:
        done = zip(previous.inputs, previous.done, strict=True)
        _check_kept(out, (path for path, kept in done if kept), inputs)
    if previous is not None and previous.unfinished and previous.inputs == inputs:
        # Same inputs as the interrupted run: continue in place, retrying skipped files.
        status = np.load(partial / "status.npy", mmap_mode="r+")
        status[status == _SKIPPED] = _PENDING
        status.flush()
        for log in partial.glob("skipped-*.jsonl"):
            log.unlink()
    else:
        if _partial_state(partial) == "unfinished" and not resume:
            print(
                f"discarding the unfinished run in {quoted(partial)} (--overwrite)",
                file=sys.stderr,
            )
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
    crop: str,
    decode: str,
    batch_size: int | None,
    max_tokens: int | None,
    workers: int,
    show_progress: bool,
    verbose: bool,
    rank: int,
) -> None:
    if pool == "patch" and crop == "none":
        features = ragged.RaggedRows(partial)
    else:
        features = NpyRows(partial / "features.npy")
    status = np.load(partial / "status.npy", mmap_mode="r+")
    times = StageTimes()
    batches = iter_features(
        model,
        inputs,
        rows,
        pool=pool,
        crop_size=crop_size,
        decode=decode,
        batch_size=batch_size,
        workers=workers,
        times=times,
        crop=crop,
        max_tokens=max_tokens,
    )
    progress = tqdm(
        total=len(rows), unit="img", desc="embed", file=sys.stderr, disable=not show_progress
    )
    log_path = partial / f"skipped-{rank}.jsonl"
    with open(log_path, "a") as log, progress:
        for read_rows, pooled, failed in batches:
            started = time.perf_counter()
            for row, reason in failed:
                tqdm.write(f"skipped {quoted(inputs[row])}: {reason}", file=sys.stderr)
                with disk_full_names(log_path):
                    log.write(json.dumps({"row": row, "reason": reason}) + "\n")
            if failed:
                with disk_full_names(log_path):
                    log.flush()
            if read_rows:
                features.write(read_rows, pooled)
            status[read_rows] = _DONE
            status[[row for row, _ in failed]] = _SKIPPED
            times.write += time.perf_counter() - started
            progress.update(len(read_rows) + len(failed))
    features.flush()
    status.flush()
    if verbose:
        where = f"rank {rank}: " if rank else ""
        print(f"{where}{times.summary(workers)}", file=sys.stderr)


def _finish(out: Path, output: OutputFormat, unlisted: list[tuple[str, str]]) -> EmbedResult:
    """Compact the partial run into the output and write the manifest (rank 0), which
    lists the files the listing left out (``unlisted``) with those that could not be read.

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
    skipped = len(skipped_rows) + len(unlisted)
    result = EmbedResult(out, manifest_path(out), partial, len(written), skipped)
    if not len(written) and inputs:
        # Nothing to show for the run: an earlier --out and its manifest stay as they were.
        # (A shard with no inputs at all is finished empty, so that a merge finds it.)
        return result
    reasons = {}
    for log in sorted(partial.glob("skipped-*.jsonl")):
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            reasons[entry["row"]] = entry["reason"]
    features = np.load(partial / "features.npy", mmap_mode="r")
    if ragged.is_ragged(settings):
        ready, fields = ragged.write_output(output, partial, features, written, inputs, settings)
    else:
        ready = output.write(partial, features, written, inputs, settings)
        fields = {"shape": [len(written), *settings["feature_shape"]]}
    del features
    manifest = {
        "features": out.name,
        "format": output.name,
        "shape": fields.pop("shape"),
        **settings,
        **fields,
        "inputs": [inputs[r] for r in written],
        "skipped": [
            *({"path": path, "reason": reason} for path, reason in unlisted),
            *({"path": inputs[r], "reason": reasons.get(int(r), "?")} for r in skipped_rows),
        ],
    }
    write_json(partial / _FINISHED, {"features_file": ready, "manifest": manifest})
    _complete_finish(out)
    return result


def _list_inputs(patterns: Sequence[str], num_shards: int, shard_index: int) -> Inputs:
    """The inputs of the run (its shard of the listing), the listing's skipped named."""
    listing = collect_inputs(patterns)
    if num_shards > 1:
        # Files the listing left out are named by the first shard only, so that a merge
        # names each once.
        unlisted = listing.skipped if shard_index == 0 else []
        listing = Inputs(shard_of(listing.paths, num_shards, shard_index), unlisted)
    for path, reason in listing.skipped:
        print(f"skipped {quoted(path)}: {reason}", file=sys.stderr)
    return listing


def _run_settings(
    model: str,
    config: Any,
    torch_dtype: torch.dtype,
    output: OutputFormat,
    *,
    pool: str,
    crop_size: int,
    decode: str,
    num_shards: int,
    shard_index: int,
    crop: str = "center",
) -> dict[str, Any]:
    """What a run's rows depend on: a resume must match them, a merge joins equal ones."""
    check_image_size(crop_size, config.patch_size, "--size")
    return {
        "model": model_identity(model),
        "model_fingerprint": model_fingerprint(model),
        "pool": pool,
        "crop": crop,
        "crop_size": crop_size,
        # Uncropped, the shortest edge is resized to --size itself.
        "resize_size": crop_size if crop == "none" else resize_size_for(crop_size),
        "decode": decode,
        "model_dtype": dtype_name(torch_dtype),
        # numpy has no bfloat16: those features are stored as float32, as all of Parquet's.
        "features_dtype": "float16"
        if torch_dtype == torch.float16 and output.name == "npy"
        else "float32",
        "feature_shape": feature_shape(
            pool, config.hidden_size, config.patch_size, crop_size, crop
        ),
        # [index, count] of a sharded run (None: all inputs), so that shards never mix.
        "shard": [shard_index, num_shards] if num_shards > 1 else None,
    }


def default_workers(device: torch.device) -> int:
    """Decoding processes per process, from the cores this process may run on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_process = (cores or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    # On a GPU, decoding is the bottleneck: every core but the one feeding the GPU decodes.
    # On the CPU the model needs cores too: half of them decode.
    if device.type == "cuda":
        return max(1, min(16, per_process - 1))
    return max(1, per_process // 2)


def embed_images(
    patterns: Sequence[str],
    model: str,
    out: str | os.PathLike,
    *,
    pool: str = "cls",
    crop_size: int = 224,
    crop: str = "center",
    decode: str = "exact",
    batch_size: int | None = None,
    max_tokens: int | None = None,
    dtype: str = "auto",
    device: str = "auto",
    workers: int | None = None,
    backend: str = "auto",
    format: str = "npy",
    engine: str = "local",
    ray_address: str | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
    verbose: bool = False,
) -> EmbedResult:
    """Embed images to ``out`` (a ``.npy`` file, or a folder of Parquet parts for ``format``
    ``parquet``) and its manifest; see the module docstring.

    An existing ``out`` (or its manifest, or an unfinished run) is an error unless ``resume``
    keeps its rows or ``overwrite`` replaces it. With ``num_shards`` above 1 the run embeds
    shard ``shard_index`` of the inputs (``sources.shard_of``); ``dinov2-fast merge`` joins
    the shards' outputs. Under torchrun every rank calls this with the same arguments and
    gets the same result. ``crop``, ``batch_size`` and ``max_tokens`` are ``--crop``,
    ``--batch-size`` and ``--max-tokens`` (``engine.iter_features``). ``engine`` ``ray``
    runs the job on the Ray cluster at ``ray_address`` (``ray_engine``; Parquet and centre
    crops only, ``workers`` unused).
    """
    out = Path(out)
    if engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got {engine}")
    if ray_address is not None and engine != "ray":
        raise UserError("--ray-address names the cluster of --engine ray: add --engine ray")
    if engine == "ray" and format != "parquet":
        raise UserError(
            f"--engine ray writes Parquet parts from the cluster: add --format parquet "
            f"(got --format {format})"
        )
    output = FORMATS.get(format)
    if output is None:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {format}")
    output.check_out(out)
    if not 0 <= shard_index < num_shards:
        raise UserError(
            f"--shard-index must be from 0 to --num-shards - 1 ({num_shards - 1}), "
            f"got {shard_index}"
        )
    if pool not in POOLS:
        raise UserError(f"--pool must be one of {', '.join(POOLS)}, got {pool}")
    if resume and overwrite:
        raise UserError("--resume keeps the earlier rows and --overwrite drops them: pick one")
    check_decode(decode, device)
    check_crop(crop, decode)
    for option, value in (("--batch-size", batch_size), ("--max-tokens", max_tokens)):
        if value is not None and value < 1:
            raise UserError(f"{option} must be at least 1, got {value}")
    if engine == "ray":
        unsupported = [
            option
            for option, used in (
                ("--crop none", crop == "none"),
                ("--max-tokens", max_tokens is not None),
                ("--decode gpu", decode == "gpu"),
            )
            if used
        ]
        if unsupported:
            raise UserError(
                f"--engine ray embeds centre crops in fixed-size batches, decoded on the CPU: "
                f"drop {', '.join(unsupported)}, or use --engine local"
            )
        from .ray_engine import embed_on_ray

        return embed_on_ray(
            patterns,
            model,
            out,
            output,
            pool=pool,
            crop_size=crop_size,
            decode=decode,
            batch_size=DEFAULT_BATCH_SIZE if batch_size is None else batch_size,
            dtype=dtype,
            device=device,
            backend=backend,
            num_shards=num_shards,
            shard_index=shard_index,
            resume=resume,
            overwrite=overwrite,
            ray_address=ray_address,
            show_progress=show_progress,
        )
    ranks = Ranks.from_env()
    lock = RunLock(out)
    try:

        def check() -> Inputs:
            _check_writable(out, output)
            lock.acquire()
            _check_existing(out, resume=resume, overwrite=overwrite)
            return _list_inputs(patterns, num_shards, shard_index)

        inputs, unlisted = ranks.on_rank0(check)
        torch_device = resolve_device(device, ranks.local_rank)
        if torch_device.type == "cuda":
            # Pinned host memory and stray allocations follow the current device, not cuda:0.
            torch.cuda.set_device(torch_device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        net = load_model(model, dtype=torch_dtype, device=torch_device, backend=backend)
        check_max_tokens(max_tokens, crop_size, net)
        settings = _run_settings(
            model,
            net.config,
            torch_dtype,
            output,
            pool=pool,
            crop=crop,
            crop_size=crop_size,
            decode=decode,
            num_shards=num_shards,
            shard_index=shard_index,
        )
        pending = ranks.on_rank0(lambda: _prepare(out, output, inputs, settings, resume))
        _embed_rows(
            net,
            _partial_dir(out),
            inputs,
            np.array_split(pending, ranks.world)[ranks.rank],
            pool=pool,
            crop_size=crop_size,
            crop=crop,
            decode=decode,
            batch_size=batch_size,
            max_tokens=max_tokens,
            workers=default_workers(torch_device) if workers is None else workers,
            show_progress=show_progress and ranks.rank == 0,
            verbose=verbose,
            rank=ranks.rank,
        )
        ranks.barrier()
        return ranks.on_rank0(lambda: _finish(out, output, unlisted))
    finally:
        lock.release()
        ranks.close()
