"""Listing the inputs: files, folders (recursive), globs and tar shards to image paths, in
row order, and reading an input's bytes.

Row order: the inputs in command-line order; a folder contributes its images (recursively,
hidden files and folders left out) sorted by path, a glob its image matches sorted by path.
Folders and ``**`` follow links to folders, each real folder once (a link loop ends there);
a file met twice, by the same path or through links, keeps its first place and path.

Tar shards (webdataset, as img2dataset writes them): an uncompressed ``.tar`` named or
matched by a glob contributes its image members in the tar's order, each a row keyed
``TAR::MEMBER``; brace patterns (``shards/{00000..00099}.tar``, ``{a,b}``) expand first.
A folder lists images only, not the tars in it.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import os
import re
import stat
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from .._resolve import UserError, first_line, quoted

__all__ = ["Inputs", "collect_inputs", "read_input", "shard_of"]

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


_TAR_KEY = ".tar::"
_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


def _braces(pattern: str) -> list[str]:
    """``{00000..00002}`` (zero-padded as written) and ``{a,b}`` alternatives, as a shell
    expands them; a pattern without them, or an existing path, stands for itself."""
    found = _BRACES.search(pattern)
    if found is None or os.path.exists(pattern):
        return [pattern]
    body = found.group(1)
    numbers = _RANGE.fullmatch(body)
    if numbers:
        first, last = (int(n) for n in numbers.groups())
        width = len(numbers.group(1)) if numbers.group(1).startswith("0") else 0
        step = 1 if last >= first else -1
        choices = [f"{n:0{width}d}" for n in range(first, last + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        return [pattern]
    head, tail = pattern[: found.start()], pattern[found.end() :]
    return [expanded for choice in choices for expanded in _braces(head + choice + tail)]


@functools.lru_cache(maxsize=16)
def _tar_members(tar: str) -> tuple[dict[str, tuple[int, int]], str | None]:
    """A tar's regular members: name -> (offset of the data, size), and why the listing
    stopped early (a tar cut short), or None. Cached per process, so that each decoding
    process reads a tar's headers once."""
    members: dict[str, tuple[int, int]] = {}
    with tarfile.open(tar, "r:") as archive:
        try:
            for member in archive:
                if member.isfile():
                    members[member.name] = (member.offset_data, member.size)
        except tarfile.ReadError as err:
            return members, first_line(err)
    return members, None


def _tar_images(tar: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The keys of a tar's image members in the tar's order, and the tar (or what of it
    could not be listed) skipped with why."""
    try:
        members, stopped = _tar_members(tar)
    except (OSError, tarfile.TarError) as err:
        return [], [(tar, f"cannot list the tar: {first_line(err)}")]
    skipped = []
    if stopped is not None:
        reason = f"cannot list the tar past its member {len(members)}: {stopped}"
        skipped.append((tar, reason))
    return [f"{tar}::{name}" for name in members if _is_image_name(name)], skipped


def _tar_key(path: str) -> tuple[str, str] | None:
    """(tar, member) of a ``TAR::MEMBER`` key; None for a file's path."""
    split = path.find(_TAR_KEY)
    if split < 0 or os.path.exists(path):
        return None
    end = split + len(".tar")
    return path[:end], path[end + len("::") :]


def read_input(item: str | os.PathLike) -> bytes:
    """The bytes of a listed input: a file, or a tar member keyed ``TAR::MEMBER``."""
    path = os.fspath(item)
    key = _tar_key(path)
    if key is None:
        return Path(path).read_bytes()
    tar, member = key
    members, _ = _tar_members(tar)
    if member not in members:
        raise OSError(f"no member {member!r} in the tar (changed since it was listed?)")
    offset, size = members[member]
    with open(tar, "rb") as archive:
        archive.seek(offset)
        data = archive.read(size)
    if len(data) < size:
        raise OSError(f"the tar ends inside this member ({len(data)} of {size} bytes)")
    return data


def _tars(pattern: str) -> list[str]:
    """The tar a pattern names, or the tars a glob matches when it matches tars only."""

    def is_tar(path: str) -> bool:
        return path.lower().endswith(".tar") and os.path.isfile(path)

    if is_tar(pattern):
        return [pattern]
    if not glob.has_magic(pattern) or "**" in pattern or os.path.exists(pattern):
        return []
    matches = sorted(glob.glob(pattern))
    return matches if matches and all(map(is_tar, matches)) else []


def _expand(pattern: str) -> tuple[list[str], bool, list[tuple[str, str]]]:
    """The image paths of one input, whether they were listed (from a folder, glob or tar)
    rather than named, and the tars that could not be listed, with why."""
    paths: list[str] = []
    listed = False
    skipped: list[tuple[str, str]] = []
    for expanded in _braces(pattern):
        tars = _tars(expanded)
        if not tars:
            images, from_listing = _expand_files(expanded)
            paths += images
            listed = listed or from_listing
            continue
        found = len(paths) + len(skipped)
        for tar in tars:
            images, unreadable = _tar_images(os.path.normpath(tar))
            paths += images
            skipped += unreadable
        if len(paths) + len(skipped) == found:
            raise UserError(f"no image members in {quoted(expanded)} ({_accepted()})")
        listed = True
    return paths, listed, skipped


def _expand_files(pattern: str) -> tuple[list[str], bool]:
    """The image paths of a file, folder or glob, and whether they were listed (from a
    folder or glob) rather than named."""
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
        paths, listed, unreadable = _expand(pattern)
        skipped += unreadable
        for path in paths:
            key = _tar_key(path)
            if key is not None:
                chosen.setdefault(f"{os.path.realpath(key[0])}::{key[1]}", path)
                continue
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
