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
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image

from .._resolve import UserError

__all__ = ["collect_inputs"]

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


def _expand(pattern: str) -> list[str]:
    if os.path.isdir(pattern):
        images = _images_under(pattern)
        if not images:
            raise UserError(f"no images in folder {pattern} ({_accepted()})")
        return images
    if os.path.exists(pattern):
        return [os.path.normpath(pattern)]
    if not glob.has_magic(pattern):
        raise UserError(f"no such file or folder: {pattern}")
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
        raise UserError(f"no images match {pattern} ({_accepted()})")
    return images


def collect_inputs(patterns: Sequence[str]) -> list[str]:
    """Files, folders (recursive) and globs to image paths, in row order (module docstring)."""
    # A file is known by its real path and listed under the first path that reached it.
    chosen: dict[str, str] = {}
    for pattern in patterns:
        for path in _expand(pattern):
            chosen.setdefault(os.path.realpath(path), path)
    return list(chosen.values())
