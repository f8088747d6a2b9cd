"""``dinov2-fast``: embed images, verify the fast path, benchmark it, report the setup.

Errors in arguments or files are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

from ._diagnostics import bench, info, tune, verify
from ._resolve import (
    CROPS,
    DECODES,
    DTYPES,
    POOLS,
    SIZES,
    SharedError,
    UserError,
    first_line,
    quoted,
)
from .ops import BACKENDS

if TYPE_CHECKING:
    from .embedding import EmbedResult

__all__ = ["main"]

_PROG = "dinov2-fast"
_MODEL_HELP = f"model folder, .pth, hub id, or a random-weight size ({', '.join(SIZES)})"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} is below the minimum, {minimum}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _count(text: str) -> int:
    return _whole_number(text, 0)


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="model dtype; auto: bfloat16 on GPUs that have it, float16 on older GPUs, "
        "float32 on CPU",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present"
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="auto: the Triton fast path on CUDA, plain PyTorch otherwise",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=_PROG, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser(
        "embed",
        help="images to a features .npy and a manifest",
        description="Embed images (files, folders searched recursively, globs) into FEATURES.npy "
        "and FEATURES.manifest.json. Rows follow the inputs in command-line order, a folder's or "
        "glob's images sorted by path. Under torchrun the inputs are sharded across processes.",
    )
    embed.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder or glob")
    embed.add_argument(
        "--model",
        required=True,
        help="local transformers model folder, original .pth file, or hub id",
    )
    embed.add_argument(
        "--out",
        required=True,
        metavar="OUT",
        help="features file (FEATURES.npy), or the folder of Parquet parts for --format parquet",
    )
    embed.add_argument(
        "--format",
        choices=("npy", "parquet"),
        default="npy",
        help="npy: one .npy file (default); parquet: a folder of Parquet parts with columns "
        "path and embedding (needs pyarrow)",
    )
    embed.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this machine, torchrun processes on it (default); ray: a Ray cluster, "
        "Parquet parts written by its workers (needs --format parquet and "
        "pip install 'dinov2-fast[ray]')",
    )
    embed.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="the Ray cluster of --engine ray (default: RAY_ADDRESS, else a new cluster on "
        "this machine)",
    )
    embed.add_argument(
        "--num-shards",
        type=_positive_int,
        default=1,
        metavar="N",
        help="split the listed inputs into N contiguous shards and embed one of them "
        "(--shard-index); join the shards' outputs with dinov2-fast merge",
    )
    embed.add_argument(
        "--shard-index", type=_count, default=0, metavar="I", help="the shard to embed, 0 to N-1"
    )
    embed.add_argument(
        "--pool",
        choices=POOLS,
        default="cls",
        help="cls: pooler_output (default); mean: mean of patch tokens; "
        "cls+mean: both concatenated; patch: all patch tokens",
    )
    embed.add_argument(
        "--size",
        type=_positive_int,
        default=224,
        metavar="S",
        help="center-crop size, at least the model's patch (14); the shortest edge is resized "
        "to round(S*256/224) (with --crop none: to S)",
    )
    embed.add_argument(
        "--crop",
        choices=CROPS,
        default="center",
        help="center: the SxS center crop (default); none: the whole image at its own aspect "
        "ratio, the shortest edge resized to S, each side floored to a patch multiple "
        "(--pool patch then gives each image its own grid, see docs/cli.md)",
    )
    embed.add_argument(
        "--decode",
        choices=DECODES,
        default="exact",
        help="exact: transformers' pixels (default); fast: JPEGs decoded at a reduced scale "
        "first (a different pipeline, see docs/cli.md); gpu: JPEGs decoded and resized on the "
        "GPU by nvjpeg (needs torchvision; also a different pipeline)",
    )
    embed.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help="images per batch, at most (default: 64, or no cap with --max-tokens)",
    )
    embed.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=None,
        metavar="N",
        help="tokens per batch, at most: per image 1 + registers + patches; with --crop none "
        "images are grouped by size to fill batches, and one over N is skipped with the reason",
    )
    embed.add_argument(
        "--workers",
        type=_count,
        default=None,
        help="image-decoding processes (default: from this process's cores: on GPU all but "
        "one, shared among local processes, up to 16; on CPU half of them)",
    )
    embed.add_argument(
        "--verbose",
        action="store_true",
        help="at the end, the time spent reading, decoding and resizing, in the model and "
        "writing, to see what bounds the run",
    )
    existing = embed.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows an earlier run of the same settings wrote to --out (finished or "
        "interrupted) and embed only the rest",
    )
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out, its manifest and any unfinished run of it",
    )
    _add_runtime_options(embed)
    embed.set_defaults(run=_run_embed)

    merge = commands.add_parser(
        "merge",
        help="join the outputs of a sharded embed into one",
        description="Join the outputs of embed --num-shards N (every shard once, same settings, "
        "npy or Parquet) into OUT and its manifest, rows in the unsharded run's order.",
    )
    merge.add_argument("out", metavar="OUT", help="the merged features (.npy, or a folder)")
    merge.add_argument("shards", nargs="+", metavar="SHARD", help="a shard's --out")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    merge.set_defaults(run=_run_merge)

    verify = commands.add_parser(
        "verify",
        help="fast path against the reference on a random input",
        description="Run the fast path and the float32 reference on the same random input, print "
        "relative errors per layer and output, exit 1 past the tolerance.",
    )
    verify.add_argument("--model", default="small", help=_MODEL_HELP)
    verify.add_argument("--image-size", type=_positive_int, default=224)
    verify.add_argument("--batch-size", type=_positive_int, default=2)
    _add_runtime_options(verify)
    verify.set_defaults(run=_run_diagnostic)

    bench = commands.add_parser(
        "bench",
        help="images/s against transformers",
        description="Time the forward pass per batch size, against transformers when installed.",
    )
    bench.add_argument("--model", default="small", help=_MODEL_HELP)
    bench.add_argument(
        "--batch",
        dest="batches",
        type=_positive_int,
        nargs="+",
        default=None,
        metavar="N",
        help="batch sizes (default: 1 8 on CPU, 1 32 128 on GPU)",
    )
    bench.add_argument("--image-size", type=_positive_int, default=224)
    bench.add_argument(
        "--iters",
        type=_positive_int,
        default=None,
        help="timed runs per row (default: 3 on CPU, 20 on GPU)",
    )
    _add_runtime_options(bench)
    bench.set_defaults(run=_run_diagnostic)

    tune = commands.add_parser(
        "tune",
        help="choose and cache the fast path's plan per batch size (CUDA)",
        description="Time every candidate of each fusion site (attention kernel configs and "
        "SDPA backends, GELU in the GEMM epilogue or in a kernel, fused or plain LayerNorm) on "
        "random inputs of each batch size, keep the fastest that passes the numerics rule, and "
        "cache it, so no live request pays for tuning. Needs a CUDA device.",
    )
    tune.add_argument("--model", default="small", help=_MODEL_HELP)
    tune.add_argument(
        "--batch",
        dest="batches",
        type=_positive_int,
        nargs="+",
        default=[1, 64],
        metavar="N",
        help="batch sizes to tune (default: 1 64); batches share a plan up to the next power of 2",
    )
    tune.add_argument("--image-size", type=_positive_int, default=224)
    tune.add_argument("--retune", action="store_true", help="time again even if a plan is cached")
    _add_runtime_options(tune)
    tune.set_defaults(run=_run_diagnostic)

    info = commands.add_parser("info", help="versions, device, usable backends, tuned plans")
    info.set_defaults(run=_run_info)
    return parser


def _run_embed(args: argparse.Namespace) -> int:
    # Imported here: it needs Pillow and tqdm (the cli extra), which the other commands do not.
    from .embedding import embed_images

    result = embed_images(
        args.inputs,
        args.model,
        args.out,
        pool=args.pool,
        crop_size=args.size,
        crop=args.crop,
        decode=args.decode,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        dtype=args.dtype,
        device=args.device,
        workers=args.workers,
        backend=args.backend,
        format=args.format,
        engine=args.engine,
        ray_address=args.ray_address,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        resume=args.resume,
        overwrite=args.overwrite,
        verbose=args.verbose,
    )
    if _rank() != 0:
        return 0 if result.rows else 1
    # Nothing written: the run is kept (local engine) or its empty --out removed (Ray). A
    # shard with no inputs at all is an empty output, written.
    if not result.rows and (result.partial.exists() or not result.features.exists()):
        # The Ray engine keeps no partial run: its rows go to --out as they are written.
        kept = (
            f", the run is kept in {quoted(result.partial)} (--resume tries the files again)"
            if result.partial.exists()
            else ""
        )
        print(
            f"{_PROG}: error: no input could be read ({result.skipped} skipped, named above); "
            f"nothing written to {quoted(result.features)}{kept}",
            file=sys.stderr,
        )
        return 1
    _print_output(result)
    return 0


def _run_merge(args: argparse.Namespace) -> int:
    from .embedding.merge import merge_outputs

    result = merge_outputs(args.out, args.shards, overwrite=args.overwrite)
    _print_output(result)
    return 0


def _print_output(result: EmbedResult) -> None:
    written = json.loads(result.manifest.read_text())
    shape = " x ".join(str(n) for n in written["shape"])
    parts = ", Parquet parts" if written.get("format") == "parquet" else ""
    print(f"features: {result.features} ({shape}, {written['features_dtype']}{parts})")
    print(
        f"manifest: {result.manifest} ({result.rows} inputs in row order, {result.skipped} skipped)"
    )


def _run_diagnostic(args: argparse.Namespace) -> int:
    options = {k: v for k, v in vars(args).items() if k not in ("command", "run", "model")}
    return {"verify": verify, "bench": bench, "tune": tune}[args.command](args.model, **options)


def _run_info(args: argparse.Namespace) -> int:
    return info()


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _error(message: str) -> None:
    # Under torchrun, say which process met an error only one of them had.
    where = f"rank {_rank()}: " if _rank() else ""
    print(f"{_PROG}: error: {where}{message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = _build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (UserError, OSError) as err:
        # An error every rank shares (SharedError) is reported once, by rank 0.
        if not isinstance(err, SharedError) or _rank() == 0:
            _error(first_line(err))
        return 2
    except ImportError as err:
        # Pillow and tqdm come with the cli extra, transformers with its own.
        _error(f"{err} (pip install 'dinov2-fast[cli,transformers]')")
        return 2
    except KeyboardInterrupt:
        if _rank() == 0:
            hint = ""
            if args.command == "embed":
                hint = "; rerun the same command with --resume to continue"
            print(f"{_PROG}: interrupted{hint}", file=sys.stderr)
        return 130
