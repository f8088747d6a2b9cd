"""Listing the inputs: files, folders (recursive) and globs to image paths, in row order.

Row order: the inputs in command-line order; a folder contributes its images (recursively,
hidden files and folders left out) sorted by path, a glob its image matches sorted by path.
Folders and ``**`` follow links to folders, each real folder once (a link loop ends there);
a file met twice, by the same path or through links, keeps its first place and path.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from .._resolve import UserError, quoted

__all__ = ["Inputs", "collect_inputs", "shard_of"]

# Formats Pillow can read (some of its registered extensions, such as .pdf, are write-only).
_IMAGE_SUFFIXES = frozenset(
    ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN
)
_COMMON_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def _is_image_name(path: str) -> bool:
    return Path(path).suffix.lower() in _IMAGE_SUFFIXES


def _accepted() -> str:
    common = [ext for ext in _COMMON_SUFFIXES if ext in _IMAGE_SUFFIXES]
    more = len(_IMAGE_SUFFIXES) - len(common)
    return f"looked for {', '.join(common)} and {more} more extensions Pillow reads"


def _walk(root: str) -> Iterator[tuple[str, list[str]]]:
    """Each folder under ``root`` with its file names, sorted, hidden names left out.

    Links to folders are followed, but every real folder is entered once, so a link loop
    or a second link to the same folder adds nothing.
    """
    entered = {os.path.realpath(root)}
    for folder, dirs, files in os.walk(root, followlinks=True):
        kept = []
        for name in sorted(dirs):
            real = os.path.realpath(os.path.join(folder, name))
            if not name.startswith(".") and real not in entered:
                entered.add(real)
                kept.append(name)
        dirs[:] = kept
        yield folder, sorted(f for f in files if not f.startswith("."))


def _images_under(folder: str) -> list[str]:
    return sorted(
        os.path.normpath(os.path.join(root, name))
        for root, names in _walk(folder)
        for name in names
        if _is_image_name(name)
    )


def _matches(pattern: list[str], names: list[str]) -> bool:
    """Path components against glob components; ``**`` spans any number of folders."""
    if not pattern:
        return not names
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_matches(rest, names[i:]) for i in range(len(names) + 1))
    return bool(names) and fnmatch.fnmatchcase(names[0], head) and _matches(rest, names[1:])


def _recursive_glob(pattern: str) -> list[str]:
    """A ``**`` glob, walked by the folders' rule (``_walk``) instead of glob's, which loops."""
    parts = pattern.split(os.sep)
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = os.sep.join(parts[:fixed]) or (os.sep if pattern.startswith(os.sep) else os.curdir)
    wanted = parts[fixed:]
    matched: dict[str, bool] = {}
    images = []
    for folder, names in _walk(root):
        rel = os.path.relpath(folder, root)
        comps = [] if rel == os.curdir else rel.split(os.sep)
        # A folder the glob matches brings every image under it, as for a folder input.
        inside = matched.get(os.path.dirname(folder), False) or _matches(wanted, comps)
        matched[folder] = inside
        images += [
            os.path.normpath(os.path.join(folder, name))
            for name in names
            if _is_image_name(name) and (inside or _matches(wanted, [*comps, name]))
        ]
    return sorted(images)


def _expand(pattern: str) -> tuple[list[str], bool]:
    """The image paths of one input, and whether they were listed (from a folder or glob)
    rather than named."""
    if os.path.isdir(pattern):
        images = _images_under(pattern)
        if not images:
            raise UserError(f"no images in folder {quoted(pattern)} ({_accepted()})")
        return images, True
    if os.path.exists(pattern):
        return [os.path.normpath(pattern)], False
    if not glob.has_magic(pattern):
        raise UserError(f"no such file or folder: {quoted(pattern)}")
    if "**" in pattern:
        images = _recursive_glob(pattern)
    else:
        images = []
        for match in sorted(glob.glob(pattern)):
            if os.path.isdir(match):
                images += _images_under(match)
            elif _is_image_name(match):
                images.append(os.path.normpath(match))
    if not images:
        raise UserError(f"no images match {quoted(pattern)} ({_accepted()})")
    return images, True


_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _not_regular(path: str) -> str | None:
    """Why a listed path is no file to read (reading a FIFO waits forever), or None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # a broken link: reading it fails, and the run says why
    if stat.S_ISREG(mode):
        return None
    return f"not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'not a file')})"


class Inputs(NamedTuple):
    """The paths to embed, in row order, and the listed paths left out, with the reason."""

    paths: list[str]
    skipped: list[tuple[str, str]]


def collect_inputs(patterns: Sequence[str]) -> Inputs:
    """Files, folders (recursive) and globs to image paths, in row order (module docstring).

    Folders and globs list regular files (and links to them) only; anything else they meet
    (a FIFO, a device) is left out and named in ``skipped``. A path named on its own is read
    whatever it is, so a pipe can be an input.
    """
    # A file is known by its real path and listed under the first path that reached it.
    chosen: dict[str, str] = {}
    skipped: list[tuple[str, str]] = []
    for pattern in patterns:
        paths, listed = _expand(pattern)
        for path in paths:
            reason = _not_regular(path) if listed else None
            if reason is not None:
                skipped.append((path, reason))
            else:
                chosen.setdefault(os.path.realpath(path), path)
    return Inputs(list(chosen.values()), skipped)


def shard_of(paths: Sequence[str], num_shards: int, shard_index: int) -> list[str]:
    """Shard ``shard_index`` of ``num_shards`` of the listing: contiguous runs of it, sizes
    differing by at most one, so the shards in index order are the listing again."""
    start = len(paths) * shard_index // num_shards
    end = len(paths) * (shard_index + 1) // num_shards
    return list(paths[start:end])
