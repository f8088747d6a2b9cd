"""From files to pooled features: the decoding dataset, its batches, and the pooling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .._resolve import first_line
from .preprocess import load_image, preprocess

__all__ = ["ImageRows", "collate", "feature_shape", "pool_output"]


class ImageRows(Dataset):
    """Preprocessed pixels of some rows; an unreadable file yields its reason instead."""

    def __init__(self, paths: Sequence[str], rows: np.ndarray, crop_size: int) -> None:
        self.paths = paths
        self.rows = rows
        self.crop_size = crop_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        row = int(self.rows[index])
        try:
            pixels = preprocess(load_image(self.paths[row]), self.crop_size)
        # Decoders of damaged files raise nearly anything (OSError, SyntaxError, struct.error,
        # DecompressionBombError...); every one of them means "skip this file".
        except Exception as err:
            return row, None, first_line(err)
        return row, torch.from_numpy(pixels), None


def collate(
    items: list[tuple[int, torch.Tensor | None, str | None]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    read = [(row, pixels) for row, pixels, _ in items if pixels is not None]
    failed = [(row, reason) for row, pixels, reason in items if pixels is None]
    batch = torch.stack([pixels for _, pixels in read]) if read else None
    return [row for row, _ in read], batch, failed


def feature_shape(pool: str, hidden_size: int, patch_size: int, crop_size: int) -> list[int]:
    if pool == "patch":
        return [(crop_size // patch_size) ** 2, hidden_size]
    return [2 * hidden_size if pool == "cls+mean" else hidden_size]


def pool_output(output: Any, pool: str, prefix_tokens: int) -> torch.Tensor:
    """CLS after the final norm, mean of patch tokens, both, or the patch tokens themselves."""
    if pool == "cls":
        return output.pooler_output
    patches = output.last_hidden_state[:, prefix_tokens:]
    if pool == "patch":
        return patches
    mean = patches.float().mean(dim=1)
    return mean if pool == "mean" else torch.cat([output.pooler_output.float(), mean], dim=-1)
