"""What the embedding-job tests share: one small, quiet, single-process run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def embed_small(model: Path, out: Path, inputs: list[Path], **options: Any) -> Any:
    """``embed_images`` on the CPU at a 28 px crop, no workers, no progress bar."""
    from dinov2_fast.embedding import embed_images

    return embed_images(
        [str(p) for p in inputs],
        str(model),
        out,
        crop_size=28,
        device="cpu",
        workers=0,
        show_progress=False,
        **options,
    )
