"""``dinov2-fast merge``: the outputs of a sharded embed (``--num-shards``) joined into one.

The shards must all be there, each once, with the same settings; their rows follow one
another in shard order, which is the unsharded run's row order (``sources.shard_of``) for
shards of the local engine (the Ray engine's rows follow its parts' names within a shard).
Ragged shards (``ragged``) join the same way: their patches one after the other, each npy
shard's ``patch_offsets`` moved by the patches of the shards before it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._resolve import UserError, first_line, quoted
from . import ragged
from .lock import RunLock
from .runner import UNRECORDED_SETTINGS, EmbedResult, manifest_path
from .sinks import FORMATS, write_json

__all__ = ["merge_outputs"]

# Manifest fields that describe one output's rows rather than the settings they were made with.
_ROW_FIELDS = (
    "features",
    "format",
    "shape",
    "inputs",
    "skipped",
    "shard",
    "patch_offsets",
    "patch_grids",
)


def _shard_manifest(shard: Path) -> dict[str, Any]:
    manifest = manifest_path(shard)
    try:
        value = json.loads(manifest.read_text())
    except FileNotFoundError:
        raise UserError(
            f"{quoted(shard)} is no finished embed output: no {quoted(manifest)}"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{quoted(manifest)} is damaged ({first_line(err)})") from None
    if not isinstance(value, dict) or not isinstance(value.get("inputs"), list):
        raise UserError(f"{quoted(manifest)} is damaged (no list 'inputs')")
    shard_field = value.get("shard")
    if not (isinstance(shard_field, list) and len(shard_field) == 2):
        raise UserError(f"{quoted(shard)} is not a shard (embedded without --num-shards)")
    if value.get("format", "npy") not in FORMATS:
        raise UserError(f"{quoted(manifest)} is damaged (format {value.get('format')!r})")
    return value


def _settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the rows were made with (and stored as), which every shard must share."""
    settings = {k: v for k, v in manifest.items() if k not in _ROW_FIELDS}
    # Shards written before a setting was recorded had its value then (as --resume reads it).
    return {**UNRECORDED_SETTINGS, **settings, "format": manifest.get("format", "npy")}


def _check_shards(shards: list[Path], manifests: list[dict[str, Any]]) -> None:
    """All shards of one run, each once, nothing in two of them."""
    first, ours = shards[0], _settings(manifests[0])
    for shard, manifest in zip(shards[1:], manifests[1:], strict=True):
        theirs = _settings(manifest)
        for key in sorted(ours.keys() | theirs.keys()):
            if theirs.get(key) != ours.get(key):
                raise UserError(
                    f"cannot merge {quoted(shard)} with {quoted(first)}: written with "
                    f"{key}={theirs.get(key)!r} and {ours.get(key)!r}"
                )
    count = manifests[0]["shard"][1]
    owner: dict[int, Path] = {}
    for shard, manifest in zip(shards, manifests, strict=True):
        index, shard_count = manifest["shard"]
        if shard_count != count:
            raise UserError(
                f"cannot merge {quoted(shard)} (shard of {shard_count}) with {quoted(first)} "
                f"(shard of {count})"
            )
        if index in owner:
            raise UserError(
                f"{quoted(owner[index])} and {quoted(shard)} are both shard {index} of {count}"
            )
        owner[index] = shard
    missing = [index for index in range(count) if index not in owner]
    if missing:
        raise UserError(f"shard {missing[0]} of {count} is missing ({len(missing)} missing in all)")
    seen: dict[str, Path] = {}
    for shard, manifest in zip(shards, manifests, strict=True):
        for path in manifest["inputs"]:
            if path in seen:
                raise UserError(
                    f"{quoted(path)} is in both {quoted(seen[path])} and {quoted(shard)}"
                )
            seen[path] = shard


def merge_outputs(
    out: str | os.PathLike, shards: Sequence[str | os.PathLike], *, overwrite: bool = False
) -> EmbedResult:
    """Join the finished shard outputs ``shards`` (any order) into ``out`` and its manifest,
    in the shards' format. An existing ``out`` is an error unless ``overwrite``."""
    out = Path(out)
    paths = [Path(shard) for shard in shards]
    manifests = [_shard_manifest(shard) for shard in paths]
    _check_shards(paths, manifests)
    order = sorted(range(len(paths)), key=lambda i: manifests[i]["shard"][0])
    paths = [paths[i] for i in order]
    manifests = [manifests[i] for i in order]
    output = FORMATS[manifests[0].get("format", "npy")]
    output.check_out(out)
    for shard in paths:
        if not output.exists(shard):
            raise UserError(f"{quoted(shard)} is missing: its manifest is there, not its rows")
    lock = RunLock(out)
    lock.acquire()
    try:
        if not overwrite:
            for existing in (out, manifest_path(out)):
                if existing.exists():
                    raise UserError(
                        f"{quoted(existing)} already exists: add --overwrite to replace it"
                    )
        settings = {k: v for k, v in manifests[0].items() if k not in _ROW_FIELDS}
        settings["shard"] = None  # the merged output is the unsharded run's
        staging = out.with_name(f".{out.name}.merging")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            inputs = [manifest["inputs"] for manifest in manifests]
            try:
                if ragged.is_ragged(settings) and output.name == "npy":
                    ready, fields = ragged.join_npy(staging, paths, manifests, settings)
                else:
                    ready = output.join(staging, paths, inputs, settings)
                    fields = {"shape": [sum(map(len, inputs)), *settings["feature_shape"]]}
                    if ragged.is_ragged(settings):  # Parquet: the grids are columns
                        width = settings["feature_shape"][1]
                        fields["shape"] = [sum(m["shape"][0] for m in manifests), width]
            except (OSError, ValueError) as err:
                raise UserError(f"cannot merge: {first_line(err)}") from None
            manifest = {
                "features": out.name,
                "format": output.name,
                "shape": fields.pop("shape"),
                **settings,
                **fields,
                "inputs": [path for rows in inputs for path in rows],
                "skipped": [entry for m in manifests for entry in m.get("skipped", [])],
            }
            output.place(staging / ready, out)
            write_json(manifest_path(out), manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        lock.release()
    return EmbedResult(
        out, manifest_path(out), staging, len(manifest["inputs"]), len(manifest["skipped"])
    )
