"""``embed --engine ray``: the embedding run on a Ray cluster (Ray Data), and ``Embedder``, the
model stage for Ray pipelines of one's own.

The driver lists the inputs (``runner``'s listing and shards), takes the run's lock and checks
the output as the local engine does, and has one worker with an actor's resources load the
model and return the run's settings (so a model that cannot load fails before the pipeline).
The pipeline: the paths still to embed as a dataset; CPU tasks read and crop them with the
local engine's code (``engine.crop_batches``: EXIF, the exact pixels, unreadable inputs kept
as rows with their reason); an actor pool runs the model (one GPU per actor where the cluster
has GPUs, CPU actors otherwise); CPU tasks write each batch of rows as one Parquet part
straight into ``--out``. A part is named after the paths it holds and written under a hidden
name, then renamed, so a retried task rewrites its own part whole and never adds a second
copy of its rows.

The driver gathers the skipped inputs as the parts are written; at the end it reads the
``path`` column of every part, checks that each input is in exactly one row or skipped, and
writes the manifest (``inputs`` in the table's row order: sorted parts, rows in each).
``--resume`` reads the paths of the parts already in ``--out`` and embeds only the rest; an
interrupted run leaves its finished parts, and no manifest, for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .._resolve import (
    POOLS,
    UserError,
    check_image_size,
    first_line,
    load_model,
    model_identity,
    quoted,
    resolve_device,
    resolve_dtype,
)
from .engine import ImageItem, crop_batches, embed_crops, feature_shape
from .lock import RunLock
from .preprocess import check_decode
from .runner import (
    EmbedResult,
    _check_existing,
    _check_kept,
    _check_settings,
    _check_writable,
    _damaged,
    _list_inputs,
    _partial_dir,
    _partial_state,
    _run_settings,
    manifest_path,
)
from .sinks import FORMATS, OutputFormat, write_json

__all__ = ["Embedder", "embed_on_ray"]

# A test hook: while the folder this names exists without a file "failed" in it, the worker
# that writes a part creates that file and dies right after renaming the part into place, as a
# killed task would (Ray runs the task again).
_FAIL_ONCE_ENV = "_DINOV2_FAST_RAY_FAIL_ONCE"
# The most CPUs a model actor takes on a cluster without GPUs (Ray gives its torch as many
# threads).
_CPUS_PER_ACTOR = 4


def _ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise UserError("--engine ray needs Ray Data (pip install 'dinov2-fast[ray]')") from None
    return ray


def _crops(items: Sequence[ImageItem], size: int, decode: str) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 crops ``(n, 3, S, S)`` of ``items`` (zeros where one cannot be read) and each
    one's reason for not being read ("" for one read), through the local engine's code."""
    pixels = np.zeros((len(items), 3, size, size), dtype=np.uint8)
    reasons = np.full(len(items), "", dtype=object)
    batches = crop_batches(
        items, np.arange(len(items)), crop_size=size, decode=decode, batch_size=64, workers=0
    )
    for read_rows, crops, failed, _ in batches:
        if read_rows:
            pixels[read_rows] = crops.numpy()
        for row, reason in failed:
            reasons[row] = reason
    return pixels, reasons


class Embedder:
    """The model stage of a Ray Data pipeline, a callable class for ``map_batches``::

        ds.map_batches(
            Embedder,
            fn_constructor_kwargs=dict(model="facebook/dinov2-base", pool="cls", size=224),
            batch_size=64, num_gpus=1, concurrency=4,
        )

    A batch (a dict of numpy arrays) with a ``bytes`` column (encoded image files) or an
    ``image`` column (uint8 HxWxC arrays) comes back with two columns more: ``embedding``
    (float32 ``(n, D)``, ``(n, 2D)`` for ``cls+mean``, ``(n, patches, D)`` for ``patch``;
    NaN for a row that could not be read) and ``skip_reason`` ("" for an embedded row, else
    why it was not). Preprocessing, model and pooling are ``dinov2_fast.embed``'s; ``model``,
    ``pool``, ``decode``, ``dtype``, ``device`` and ``backend`` are as for ``embed``, and
    ``size`` is its crop size.
    """

    def __init__(
        self,
        model: str,
        *,
        pool: str = "cls",
        size: int = 224,
        decode: str = "exact",
        dtype: str = "auto",
        device: str = "auto",
        backend: str = "auto",
    ) -> None:
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        try:
            check_decode(decode)
            if decode == "gpu":
                raise UserError(
                    "Embedder decodes on Ray's CPU workers: use decode='exact' or 'fast'"
                )
            torch_device = resolve_device(device)
            torch_dtype = resolve_dtype(dtype, torch_device)
            self.model = load_model(model, dtype=torch_dtype, device=torch_device, backend=backend)
            check_image_size(size, self.model.config.patch_size, "size")
        except UserError as err:
            raise ValueError(str(err)) from None
        config = self.model.config
        self.pool, self.size, self.decode = pool, size, decode
        self.shape = feature_shape(pool, config.hidden_size, config.patch_size, size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "bytes" in batch:
            items: list[ImageItem] = [bytes(data) for data in batch["bytes"]]
        elif "image" in batch:
            items = list(batch["image"])
        else:
            raise ValueError(f"a batch needs a 'bytes' or 'image' column, got {sorted(batch)}")
        pixels, reasons = _crops(items, self.size, self.decode)
        return {**batch, "embedding": self._embed(pixels, reasons), "skip_reason": reasons}

    def _embed(self, pixels: np.ndarray, reasons: np.ndarray) -> np.ndarray:
        """The features of the crops whose reason is "" (NaN rows for the others)."""
        embedding = np.full((len(pixels), *self.shape), np.nan, dtype=np.float32)
        read = np.flatnonzero(reasons == "")
        if len(read):
            with torch.inference_mode():
                pooled = embed_crops(self.model, torch.from_numpy(pixels[read]), self.pool)
            embedding[read] = pooled.float().cpu().numpy()
        return embedding


class _CropEmbedder(Embedder):
    """The run's model stage: batches of crops made by ``_crop_paths``."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        embedding = self._embed(batch["pixels"], batch["reason"])
        return {"path": batch["path"], "embedding": embedding, "reason": batch["reason"]}


def _crop_paths(batch: dict[str, np.ndarray], *, size: int, decode: str) -> dict[str, np.ndarray]:
    """The run's CPU stage: the listed inputs (files, ``TAR::MEMBER`` keys) read and cropped."""
    pixels, reasons = _crops([str(path) for path in batch["path"]], size, decode)
    return {"path": batch["path"], "pixels": pixels, "reason": reasons}


def _part_name(paths: list[str]) -> str:
    """A part's name from the paths it holds: a retried write replaces its own part."""
    return hashlib.sha256("\0".join(paths).encode()).hexdigest()[:24]


def _fail_once() -> None:
    folder = os.environ.get(_FAIL_ONCE_ENV)
    if not folder or not os.path.isdir(folder):
        return
    try:
        os.close(os.open(os.path.join(folder, "failed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)  # no cleanup, as a killed worker


def _write_part(batch: dict[str, np.ndarray], *, out: str, schema: Any) -> dict[str, np.ndarray]:
    """The run's writing stage: the batch's embedded rows as one part in ``out``; returns
    each input with its reason for having no row ("" for one written)."""
    reasons = batch["reason"]
    read = np.flatnonzero(reasons == "")
    if len(read):
        parquet = FORMATS["parquet"]
        paths = [str(batch["path"][row]) for row in read]
        table = parquet.table(schema, paths, batch["embedding"][read])
        parquet.write_part(Path(out), _part_name(paths), table)
        _fail_once()
    return {"path": batch["path"], "reason": reasons}


def _load_settings(model: str, dtype: str, device: str, backend: str, **options: Any) -> Any:
    """On a worker with an actor's resources: the run's settings, or the error's line."""
    try:
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        net = load_model(model, dtype=torch_dtype, device=torch_device, backend=backend)
        return _run_settings(model, net.config, torch_dtype, FORMATS["parquet"], **options)
    # A model that cannot load fails the run in one line, whatever load_model raised.
    except Exception as err:
        return UserError(first_line(err))


def _part_paths(out: Path) -> dict[Path, list[str]]:
    """The paths held by each part in ``out``, in the order a reader reads them."""
    import pyarrow.parquet as pq  # a dependency of Ray Data

    parts = {}
    for part in sorted(out.glob("part-*.parquet")):
        try:
            parts[part] = pq.read_table(part, columns=["path"]).column("path").to_pylist()
        except (OSError, ValueError, KeyError) as err:  # ArrowException is OSError/ValueError
            raise _damaged(part, first_line(err)) from None
    return parts


def _written(out: Path, settings: dict[str, Any]) -> list[str]:
    """For ``--resume``: the paths of the rows in ``out``'s parts, refused if their settings
    are not this run's."""
    import pyarrow.parquet as pq  # a dependency of Ray Data

    parquet = FORMATS["parquet"]
    paths = []
    for part, held in _part_paths(out).items():
        metadata = pq.read_schema(part).metadata or {}
        try:
            written = json.loads(metadata[parquet.metadata_key])
        except (KeyError, ValueError):
            raise _damaged(part, "no dinov2_fast settings in its schema") from None
        _check_settings(out, written, settings)
        paths += held
    return paths


def _prepare(
    out: Path, inputs: list[str], settings: dict[str, Any], *, resume: bool, overwrite: bool
) -> list[str]:
    """Set ``out`` up for the run's parts; returns the inputs still to embed."""
    partial = _partial_dir(out)
    if _partial_state(partial) == "unfinished" and not overwrite:
        raise UserError(
            f"an unfinished run of the local engine is in {quoted(partial)}: continue it with "
            "--engine local --resume, or start over with --overwrite"
        )
    if overwrite:
        if out.exists():
            print(f"removing the earlier output {quoted(out)} (--overwrite)", file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
        # A local run's leftovers too, which a later --engine local --resume would continue.
        shutil.rmtree(partial, ignore_errors=True)
    done: set[str] = set()
    if resume and out.is_dir():
        written = _written(out, settings)
        _check_kept(out, written, inputs)
        done = set(written)
        print(f"resuming: {len(done)} of {len(inputs)} rows already written", file=sys.stderr)
    # The manifest is written anew at the end; until then it would not describe the parts.
    manifest_path(out).unlink(missing_ok=True)
    out.mkdir(exist_ok=True)
    return [path for path in inputs if path not in done]


def _check_rows(out: Path, inputs: list[str], skipped: dict[str, str]) -> list[str]:
    """The paths of ``out``'s rows in row order, after checking that every input is in
    exactly one row or was skipped, and that no row is of another input."""
    paths = [path for held in _part_paths(out).values() for path in held]
    counts = Counter(paths)
    fix = "rerun with --overwrite to start over"
    twice = [path for path, count in counts.items() if count > 1]
    if twice:
        raise UserError(
            f"{len(twice)} inputs have more than one row in {quoted(out)}, such as "
            f"{quoted(twice[0])}: {fix}"
        )
    given = set(inputs)
    foreign = [path for path in paths if path not in given]
    if foreign:
        raise UserError(
            f"{len(foreign)} rows in {quoted(out)} are of no input of this run, such as "
            f"{quoted(foreign[0])}: {fix}"
        )
    missing = [path for path in inputs if path not in counts and path not in skipped]
    if missing:
        raise UserError(
            f"{len(missing)} inputs got no row and were not skipped, such as "
            f"{quoted(missing[0])}: rerun with --resume to embed them"
        )
    return paths


def _run_pipeline(
    ray: Any,
    out: Path,
    pending: list[str],
    settings: dict[str, Any],
    *,
    batch_size: int,
    dtype: str,
    device: str,
    backend: str,
    on_gpu: bool,
    show_progress: bool,
) -> dict[str, str]:
    """Embed ``pending`` into parts in ``out``; returns the inputs skipped, with why."""
    parquet = FORMATS["parquet"]
    schema = parquet.schema(settings)
    resources = ray.cluster_resources()
    if on_gpu:
        actors = ray.data.ActorPoolStrategy(size=int(resources["GPU"]))
        actor_resources = {"num_gpus": 1}
    else:
        # Half the CPUs for the model, half for decoding, as the local engine splits them.
        cpus = int(resources.get("CPU", 1))
        threads = max(1, min(_CPUS_PER_ACTOR, cpus // 2))
        most = max(1, cpus // (2 * threads))
        actors = ray.data.ActorPoolStrategy(min_size=1, max_size=most)
        actor_resources = {"num_cpus": threads}
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the run's own bar counts inputs
    context.raise_original_map_exception = True  # for _worker_error
    # A block per batch: the decoding tasks spread over the cluster batch by batch.
    ds = ray.data.from_items(
        [{"path": path} for path in pending],
        override_num_blocks=max(1, -(-len(pending) // batch_size)),
    )
    size, decode = settings["crop_size"], settings["decode"]
    ds = ds.map_batches(
        _crop_paths,
        batch_size=batch_size,
        fn_kwargs={"size": size, "decode": decode},
        # Ray's default (workers reused without limit), given so that these remote args
        # differ from the actors': Ray Data fuses stages of equal ones (both take one CPU on
        # a cluster without GPUs), which would move decoding into the model's processes.
        max_calls=0,
    )
    ds = ds.map_batches(
        _CropEmbedder,
        fn_constructor_args=(settings["model"],),
        fn_constructor_kwargs={
            "pool": settings["pool"],
            "size": size,
            "decode": decode,
            "dtype": dtype,
            "device": device,
            "backend": backend,
        },
        batch_size=batch_size,
        compute=actors,
        **actor_resources,
    )
    ds = ds.map_batches(
        _write_part,
        batch_size=parquet.part_rows(schema),
        fn_kwargs={"out": str(out), "schema": schema},
    )
    skipped: dict[str, str] = {}
    progress = tqdm(
        total=len(pending), unit="img", desc="embed", file=sys.stderr, disable=not show_progress
    )
    try:
        with progress:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for path, reason in zip(batch["path"], batch["reason"], strict=True):
                    if reason:
                        tqdm.write(f"skipped {quoted(str(path))}: {reason}", file=sys.stderr)
                        skipped[str(path)] = str(reason)
                progress.update(len(batch["path"]))
    except ray.exceptions.RayError as err:
        raise _worker_error(err) from None
    return skipped


def _worker_error(err: BaseException) -> BaseException:
    """What a stage raised (a full disk's UserError, an OSError), out of the task error Ray
    wraps it in, so that it reads as one line; ``err`` itself if it is something else."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, (UserError, OSError)) else err


def embed_on_ray(
    patterns: Sequence[str],
    model: str,
    out: Path,
    output: OutputFormat,
    *,
    pool: str,
    crop_size: int,
    decode: str,
    batch_size: int,
    dtype: str,
    device: str,
    backend: str,
    num_shards: int,
    shard_index: int,
    resume: bool,
    overwrite: bool,
    ray_address: str | None,
    show_progress: bool,
) -> EmbedResult:
    """``embed_images`` with ``engine="ray"`` (its arguments checked): see the module
    docstring. Connects to ``ray_address`` (None: ``RAY_ADDRESS``, else a new local cluster)
    unless Ray is initialised already."""
    ray = _ray()
    # A local model folder by its absolute path: workers need not share the driver's cwd.
    model = model_identity(model)
    lock = RunLock(out)
    try:
        _check_writable(out, output)
        lock.acquire()
        _check_existing(out, resume=resume, overwrite=overwrite)
        inputs, unlisted = _list_inputs(patterns, num_shards, shard_index)
        connected = not ray.is_initialized()
        if connected:
            # address None: ray.init reads RAY_ADDRESS, else starts a cluster on this machine.
            ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
        try:
            gpus = ray.cluster_resources().get("GPU", 0)
            if device == "cuda" and not gpus:
                raise UserError("--device cuda: the Ray cluster has no GPU (use --device auto)")
            on_gpu = gpus > 0 and device != "cpu"
            load = ray.remote(_load_settings).options(num_gpus=1 if on_gpu else 0)
            options = dict(
                pool=pool,
                crop_size=crop_size,
                decode=decode,
                num_shards=num_shards,
                shard_index=shard_index,
            )
            settings = ray.get(load.remote(model, dtype, device, backend, **options))
            if isinstance(settings, UserError):
                raise settings
            pending = _prepare(out, inputs, settings, resume=resume, overwrite=overwrite)
            skipped = {}
            if pending:
                skipped = _run_pipeline(
                    ray,
                    out,
                    pending,
                    settings,
                    batch_size=batch_size,
                    dtype=dtype,
                    device=device,
                    backend=backend,
                    on_gpu=on_gpu,
                    show_progress=show_progress,
                )
        finally:
            if connected:
                ray.shutdown()
        return _finish(out, inputs, settings, skipped, unlisted)
    finally:
        lock.release()


def _finish(
    out: Path,
    inputs: list[str],
    settings: dict[str, Any],
    skipped: dict[str, str],
    unlisted: list[tuple[str, str]],
) -> EmbedResult:
    """Check the rows and write the manifest (none when no row was written)."""
    for stale in out.glob(".part-*.tmp"):  # a write killed before its rename
        stale.unlink()
    paths = _check_rows(out, inputs, skipped)
    result = EmbedResult(
        out, manifest_path(out), _partial_dir(out), len(paths), len(skipped) + len(unlisted)
    )
    if not paths and inputs:
        out.rmdir()
        return result
    if not inputs:
        # A shard with no inputs is finished empty, for merge: one empty part holds the
        # schema, as the local engine's does.
        parquet = FORMATS["parquet"]
        schema = parquet.schema(settings)
        empty = np.zeros((0, *settings["feature_shape"]), np.float32)
        parquet.write_part(out, _part_name([]), parquet.table(schema, [], empty))
    manifest = {
        "features": out.name,
        "format": "parquet",
        "shape": [len(paths), *settings["feature_shape"]],
        **settings,
        "inputs": paths,
        "skipped": [
            *({"path": path, "reason": reason} for path, reason in unlisted),
            *({"path": path, "reason": skipped[path]} for path in inputs if path in skipped),
        ],
    }
    write_json(manifest_path(out), manifest)
    return result
