"""Input-pipeline throughput on the CPU: ``python -m bench.input_pipeline``.

Images/s from a file on disk to the model's input (normalised 224x224 float32), for VGA
JPEGs, 12-megapixel JPEGs and PNGs: transformers' ``load_image`` + ``BitImageProcessor``
(PIL backend, configured as the facebook/dinov2-* checkpoints), against our pipeline in
``--decode exact`` and ``--decode fast``. Two figures per pipeline: one process on one
core (images/s per core), and ours with a decoding process per core as ``embed`` runs it
(transformers has no such mode; its column stays the one-process figure). Then how far
``fast`` is from ``exact``: the largest difference in normalised units and the feature
cosine on a dinov2-small-shaped random-weight model. ``--differences`` prints only those, for
``fast`` and for ``gpu``'s device half run on the CPU (torch's resize, with Pillow's decode
standing in for nvjpeg: the decode itself is not measured). ``--device cuda`` (the GPU
check) times ``exact`` against ``gpu`` with nvjpeg, from files to normalised batches on the
GPU, and measures the real ``gpu`` pipeline's difference; it prints why it is skipped where
``--decode gpu`` cannot run.

The images are drawn (smooth colour fields with noise, which JPEG codes like photos) and
cached under ``--dir``. Results and the machine they ran on are in bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinov2_fast._resolve import random_model
from dinov2_fast.embedding.engine import crop_batches
from dinov2_fast.embedding.gpu_decode import decoded_batches, nvjpeg_decode, pillow_decode
from dinov2_fast.embedding.preprocess import crop_pixels, load_image, normalize

_CASES = {
    # name: (width, height, format, images)
    "VGA JPEG": (640, 480, "JPEG", 24),
    "12 MP JPEG": (4000, 3000, "JPEG", 6),
    "VGA PNG": (640, 480, "PNG", 12),
}
_MEAN = [0.485, 0.456, 0.406]
_STD = [0.229, 0.224, 0.225]


def _draw(path: Path, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    scale = max(width, height) / 8
    channels = [
        128 + 100 * np.sin(x / scale + c + seed) * np.cos(y / (0.7 * scale) - c) for c in range(3)
    ]
    pixels = np.stack(channels, -1) + rng.normal(0, 10, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path)


def _images(folder: Path, name: str) -> list[Path]:
    width, height, fmt, count = _CASES[name]
    suffix = ".jpg" if fmt == "JPEG" else ".png"
    paths = [folder / f"{width}x{height}_{i}{suffix}" for i in range(count)]
    folder.mkdir(parents=True, exist_ok=True)
    for seed, path in enumerate(paths):
        if not path.is_file():
            _draw(path, width, height, seed)
    return paths


def _rate(work, paths: list[Path], seconds: float) -> float:
    """Images/s of ``work(path)`` over the paths, repeated for at least ``seconds``."""
    work(paths[0])
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for path in paths:
            work(path)
        done += len(paths)
    return done / (time.perf_counter() - started)


def _transformers(crop: int = 224):
    import transformers
    from transformers.image_utils import load_image as hf_load_image

    processor = transformers.BitImageProcessorPil(
        size={"shortest_edge": round(crop * 256 / 224)},
        crop_size={"height": crop, "width": crop},
        resample=3,
        image_mean=_MEAN,
        image_std=_STD,
    )
    return lambda path: processor(hf_load_image(str(path)), return_tensors="pt")


def _ours(decode: str):
    draft = 256 if decode == "fast" else None
    return lambda path: normalize(torch.from_numpy(crop_pixels(load_image(path, draft_size=draft))))


def _pipeline_rate(paths: list[Path], decode: str, workers: int, expected: float, seconds: float):
    """Images/s of embed's decoding processes, with the normalisation of each batch, from the
    first batch on (the processes' start-up is paid once per run, not per image)."""
    count = max(4 * 16 * workers, int(expected * workers * seconds))
    items = [str(paths[i % len(paths)]) for i in range(count)]
    batches = crop_batches(
        items, np.arange(count), crop_size=224, decode=decode, batch_size=16, workers=workers
    )
    _, pixels, _, _ = next(batches)
    normalize(pixels)
    done, started = 0, time.perf_counter()
    for _, pixels, _, _ in batches:
        normalize(pixels)
        done += len(pixels)
    return done / (time.perf_counter() - started)


def _gpu_inputs(paths: list[Path], device: torch.device) -> torch.Tensor:
    """``--decode gpu``'s model inputs, brought to the CPU: nvjpeg on a GPU, Pillow decoding
    in its place on the CPU."""
    items = [str(p) for p in paths]
    batches = crop_batches(
        items, np.arange(len(items)), crop_size=224, decode="gpu", batch_size=len(items), workers=0
    )
    decode = pillow_decode if device.type == "cpu" else nvjpeg_decode
    ((_, pixels, _, _),) = decoded_batches(batches, 224, device, decode)
    return normalize(pixels).cpu()


def _difference(
    paths: list[Path], decode: str = "fast", device: torch.device | None = None
) -> tuple[float, float]:
    """Largest |decode - exact| in normalised units, and the lowest feature cosine."""
    model = random_model("small")
    exact = torch.stack([_ours("exact")(p) for p in paths])
    if decode == "gpu":
        other = _gpu_inputs(paths, device or torch.device("cpu"))
    else:
        other = torch.stack([_ours(decode)(p) for p in paths])
    with torch.inference_mode():
        cosine = torch.nn.functional.cosine_similarity(
            model(pixel_values=exact).pooler_output, model(pixel_values=other).pooler_output
        )
    return (other - exact).abs().max().item(), cosine.min().item()


def _differences(folder: Path) -> None:
    print("| images | fast vs exact | gpu vs exact, resize on the CPU |")
    print("|---|---|---|")
    for name in _CASES:
        paths = _images(folder, name)
        cells = []
        for decode in ("fast", "gpu"):
            diff, cosine = _difference(paths, decode)
            cells.append(f"{diff:.3f}, {1 - cosine:.1e}")
        print(f"| {name} | {' | '.join(cells)} |", flush=True)


def _device_rate(paths: list[Path], decode: str, workers: int, device: torch.device) -> float:
    """Images/s from files to normalised batches of 8 on ``device``, after the first batch:
    four batches per decoding process."""
    count = 4 * 8 * workers
    items = [str(paths[i % len(paths)]) for i in range(count)]
    batches = crop_batches(
        items,
        np.arange(count),
        crop_size=224,
        decode=decode,
        batch_size=8,
        workers=workers,
        pin_memory=True,
    )
    if decode == "gpu":
        batches = decoded_batches(batches, 224, device)
    _, pixels, _, _ = next(batches)
    normalize(pixels.to(device, non_blocking=True))
    torch.cuda.synchronize(device)
    done, started = 0, time.perf_counter()
    for _, pixels, _, _ in batches:
        normalize(pixels.to(device, non_blocking=True))
        done += len(pixels)
    torch.cuda.synchronize(device)
    return done / (time.perf_counter() - started)


def _on_device(folder: Path) -> None:
    """``--device cuda``: exact against gpu (nvjpeg) on the JPEGs, or why gpu cannot run."""
    from dinov2_fast._resolve import UserError
    from dinov2_fast.embedding.preprocess import check_decode
    from dinov2_fast.embedding.runner import default_workers

    try:
        check_decode("gpu", "cuda")
    except UserError as err:
        print(f"--decode gpu skipped: {err}")
        return
    device = torch.device("cuda")
    workers = default_workers(device)
    print(
        f"| images | exact ({workers} workers) | gpu ({workers} workers) "
        "| gpu vs exact: max diff, 1 - min cosine |"
    )
    print("|---|---|---|---|")
    for name in ("VGA JPEG", "12 MP JPEG"):
        paths = _images(folder, name)
        exact, gpu = (_device_rate(paths, decode, workers, device) for decode in ("exact", "gpu"))
        diff, cosine = _difference(paths[:6], "gpu", device)
        print(
            f"| {name} | {exact:.1f}/s | {gpu:.1f}/s ({gpu / exact:.2f}x) "
            f"| {diff:.3f}, {1 - cosine:.1e} |",
            flush=True,
        )


def _end_to_end(folder: Path, workers: int) -> None:
    """``dinov2-fast embed`` itself on the 12 MP JPEGs with a tiny model (so the pipeline is
    what is timed), against transformers' processor and model in one loop."""
    import shutil
    import tempfile

    import transformers

    from dinov2_fast.embedding import embed_images

    transformers.utils.logging.disable_progress_bar()
    config = transformers.Dinov2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=224
    )
    with tempfile.TemporaryDirectory() as tmp:
        # Copies: embed gives a file reached twice one row.
        paths = [Path(tmp) / f"{i}.jpg" for i in range(48)]
        originals = _images(folder, "12 MP JPEG")
        for index, path in enumerate(paths):
            shutil.copy(originals[index % len(originals)], path)
        model_dir = Path(tmp) / "model"
        transformers.Dinov2Model(config).save_pretrained(model_dir)
        net = transformers.Dinov2Model.from_pretrained(model_dir).eval()
        hf_work = _transformers()
        started = time.perf_counter()
        with torch.inference_mode():
            for path in paths:
                net(**hf_work(path))
        baseline = len(paths) / (time.perf_counter() - started)
        print(
            f"\nembed end to end, {len(paths)} 12 MP JPEGs, tiny model, {workers} workers, "
            "batches of 8:"
        )
        print(f"transformers loop (1 process): {baseline:.2f} images/s")
        for decode in ("exact", "fast"):
            out = Path(tmp) / f"{decode}.npy"
            started = time.perf_counter()
            result = embed_images(
                [str(p) for p in paths],
                str(model_dir),
                out,
                decode=decode,
                # Each decoding process makes whole batches: 6 of them keep both busy.
                batch_size=8,
                device="cpu",
                workers=workers,
                show_progress=False,
            )
            rate = result.rows / (time.perf_counter() - started)
            print(
                f"dinov2-fast embed --decode {decode}: {rate:.2f} images/s "
                f"({rate / baseline:.2f}x), model load and worker start-up included"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("out/bench-inputs"))
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument(
        "--differences", action="store_true", help="only the differences from exact, no timing"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: exact against --decode gpu on the GPU, instead of the CPU table",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"machine: {platform.processor() or platform.machine()}, {cores} cores, "
        f"torch {torch.__version__}, Pillow {Image.__version__}"
    )
    if args.differences:
        _differences(args.dir)
        return
    if args.device == "cuda":
        _on_device(args.dir)
        return
    print(
        "| images | transformers (1 core) | exact (1 core) | fast (1 core) "
        f"| exact ({cores} workers) | fast ({cores} workers) "
        "| fast vs exact: max diff, 1 - min cosine |"
    )
    print("|---|---|---|---|---|---|---|")
    transformers_work = _transformers()
    for name in _CASES:
        paths = _images(args.dir, name)
        baseline = _rate(transformers_work, paths, args.seconds)
        exact = _rate(_ours("exact"), paths, args.seconds)
        fast = _rate(_ours("fast"), paths, args.seconds)
        exact_all = _pipeline_rate(paths, "exact", cores, exact, args.seconds)
        fast_all = _pipeline_rate(paths, "fast", cores, fast, args.seconds)
        diff, cosine = _difference(paths)
        cells = [f"{baseline:.1f}/s"] + [
            f"{rate:.1f}/s ({rate / baseline:.2f}x)" for rate in (exact, fast, exact_all, fast_all)
        ]
        print(f"| {name} | {' | '.join(cells)} | {diff:.3f}, {1 - cosine:.1e} |", flush=True)
    _end_to_end(args.dir, cores)


if __name__ == "__main__":
    main()
