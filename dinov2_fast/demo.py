"""``python -m dinov2_fast.demo``: the CLI end to end, with nothing to download.

Runs ``info``, ``verify`` on a dinov2-small-sized random model, then ``embed`` over a few
sample images (drawn at first run) with a random-weight dinov2-small saved by transformers'
``save_pretrained``, exactly as a downloaded checkpoint folder looks.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .cli import main as cli_main

__all__ = ["main"]


def _gradient(width: int, height: int, start: tuple[int, ...], end: tuple[int, ...]) -> Image.Image:
    ramp = np.linspace(0.0, 1.0, width)[None, :, None]
    pixels = np.asarray(start) * (1 - ramp) + np.asarray(end) * ramp
    return Image.fromarray(np.repeat(pixels, height, axis=0).astype(np.uint8))


def _draw_samples(folder: Path) -> None:
    """Six small images in the formats the pipeline meets: JPEG, PNG, greyscale, RGBA."""
    (folder / "nested").mkdir(parents=True, exist_ok=True)
    sunset = _gradient(640, 480, (250, 120, 40), (40, 20, 90))
    ImageDraw.Draw(sunset).ellipse((260, 160, 380, 280), fill=(255, 220, 120))
    sunset.save(folder / "sunset.jpg", quality=90)

    stripes = Image.new("RGB", (300, 500), (20, 90, 160))
    draw = ImageDraw.Draw(stripes)
    for top in range(0, 500, 40):
        draw.rectangle((0, top, 300, top + 18), fill=(230, 230, 230))
    stripes.save(folder / "stripes.png")

    checker = np.indices((256, 256)).sum(axis=0) // 32 % 2 * 200 + 30
    Image.fromarray(checker.astype(np.uint8), mode="L").save(folder / "checker_grey.png")

    badge = Image.new("RGBA", (200, 120), (0, 0, 0, 0))
    ImageDraw.Draw(badge).rounded_rectangle((10, 10, 190, 110), 20, fill=(30, 160, 90, 255))
    badge.save(folder / "badge_rgba.png")

    _gradient(64, 48, (0, 0, 0), (255, 255, 255)).save(folder / "nested" / "tiny.jpg")
    noise = np.random.default_rng(0).integers(0, 256, (200, 800, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "nested" / "wide.jpg", quality=85)


def _save_random_small(folder: Path) -> None:
    """A dinov2-small-shaped model with random weights, written by transformers itself."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        image_size=518,
        patch_size=14,
    )
    transformers.Dinov2Model(config).save_pretrained(folder)


def _run(command: list[str]) -> int:
    print(f"\n$ dinov2-fast {' '.join(command)}", flush=True)
    status = cli_main(command)
    sys.stdout.flush()
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare the sample images and model under ``--dir`` (once), then run the CLI on them."""
    parser = argparse.ArgumentParser(prog="python -m dinov2_fast.demo", description=__doc__)
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path("out/demo"),
        help="where the sample images, model and features go",
    )
    folder = parser.parse_args(argv).dir
    images, model = folder / "images", folder / "model"
    if not images.is_dir():
        _draw_samples(images)
    if not (model / "config.json").is_file():
        try:
            _save_random_small(model)
        except ImportError:
            print(
                "the demo needs transformers: pip install 'dinov2-fast[transformers]'",
                file=sys.stderr,
            )
            return 2
    features = folder / "features.npy"
    # A rerun of the demo starts afresh (embed refuses to replace features without --overwrite).
    for earlier in (features, features.with_suffix(".manifest.json")):
        earlier.unlink(missing_ok=True)
    shutil.rmtree(features.with_suffix(".partial"), ignore_errors=True)
    for command in (
        ["info"],
        ["verify", "--model", "small", "--batch-size", "1"],
        ["embed", str(images), "--model", str(model), "--out", str(features)],
    ):
        status = _run(command)
        if status:
            return status
    print(
        f"\nThe features of {images}/ are in {features}, their row order in "
        f"{features.with_suffix('.manifest.json')}. With real weights:\n"
        "  dinov2-fast embed PHOTOS/ --model facebook/dinov2-small --out features.npy"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
