"""What every command line shares (python -m engine, engine.eval, engine.finetune, engine.serve): the LACLIP flags
and how an engine error is printed. Every CLI imports this module; none imports another CLI."""
from __future__ import annotations

import argparse
import sys

from .errors import EngineError
from .laclip import LaclipConfig
from .records import DatasetError, bad_records


def add_laclip_arguments(parser: argparse.ArgumentParser) -> None:
    """LACLIP flags shared by every command that builds features (defaults from LaclipConfig)."""
    d = LaclipConfig()
    group = parser.add_argument_group("LACLIP")
    group.add_argument("--crops", type=int, default=d.num_crops, help="crops per image K; 0 = plain global CLIP")
    group.add_argument("--crop-mode", choices=["random", "grid"], default=d.crop_mode)
    group.add_argument("--crop-area", type=float, nargs=2, default=d.crop_area, metavar=("MIN", "MAX"))
    group.add_argument("--crop-aspect", type=float, nargs=2, default=d.crop_aspect, metavar=("MIN", "MAX"))
    group.add_argument("--tau", type=float, default=d.tau, help="softmax temperature of the crop weights")
    group.add_argument("--alpha", type=float, default=d.alpha, help="weight of the global term")
    group.add_argument("--weights", choices=["image", "text"], default=d.weights)
    group.add_argument("--seed", type=int, default=d.seed, help="crop placement seed")


def laclip_from_args(args: argparse.Namespace) -> LaclipConfig | None:
    if args.crops == 0:
        return None
    return LaclipConfig(num_crops=args.crops, crop_mode=args.crop_mode, crop_area=tuple(args.crop_area),
                        crop_aspect=tuple(args.crop_aspect), tau=args.tau, alpha=args.alpha,
                        weights=args.weights, seed=args.seed)


def report_error(exc: EngineError) -> int:
    """Print an engine error for a person (a DatasetError lists every bad record); the exit status is 2."""
    if isinstance(exc, DatasetError):
        print(f"error: {bad_records(len(exc.problems))} (rerun with --skip-bad to skip them):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
    else:
        print(f"error: {exc}", file=sys.stderr)
    return 2
