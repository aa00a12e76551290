"""Command line of `python -m engine.eval`: parse options, run `evaluate`, print tables, write JSON."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from ..cli_common import add_laclip_arguments, laclip_from_args, report_error
from ..dataset_features import DEFAULT_CACHE_DIR
from ..errors import EngineError
from ..laclip import LaclipConfig
from ..models import available_models
from ..recall import KS, Metrics
from ..records import bad_records
from .evaluate import EvalReport, EvalSettings, evaluate
from .predictions import unscorable_by_cn_clip, write_predictions


def _list_of(kind: Callable[[str], object]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine.eval", description=__doc__)
    parser.add_argument("--model", default="ViT-B-16", choices=available_models())
    parser.add_argument("--checkpoint", help="cn_clip checkpoint (.pt); default: the official weights")
    parser.add_argument("--data", required=True, type=Path,
                        help="folder with {split}_texts.jsonl and {split}_imgs.tsv or images/")
    parser.add_argument("--split", default="test")
    parser.add_argument("--layout", choices=["auto", "tsv", "folder"], default="auto",
                        help="image source: {split}_imgs.tsv (cn_clip) or images/ (image folder); "
                             "auto picks the one present")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="feature cache folder")
    parser.add_argument("--no-cache", action="store_true", help="encode everything and cache nothing")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip bad records (reported with file and line) instead of failing")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON to OUT")
    parser.add_argument("--predictions", type=Path, metavar="OUT.jsonl",
                        help="also write cn_clip's top-10 prediction files: text->image to OUT.jsonl and "
                             "image->text to OUT.tr.jsonl, for cn_clip's evaluation.py / evaluation_tr.py")
    parser.add_argument("--predictions-mode", choices=["global", "laclip"],
                        help="whose rankings --predictions writes (default: laclip when LACLIP is on, else global)")
    add_laclip_arguments(parser)
    sweep = parser.add_argument_group("sweep (one printed row per combination; unswept values from the LACLIP options)")
    sweep.add_argument("--sweep-crops", type=_list_of(int), default=(), metavar="K,K,...")
    sweep.add_argument("--sweep-tau", type=_list_of(float), default=(), metavar="T,T,...")
    sweep.add_argument("--sweep-alpha", type=_list_of(float), default=(), metavar="A,A,...")
    sweep.add_argument("--sweep-weights", type=_list_of(str), default=(), metavar="image,text")
    return parser


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    laclip = laclip_from_args(args)
    rank_mode = None
    if args.predictions is not None:
        rank_mode = args.predictions_mode or ("laclip" if laclip is not None else "global")
    return EvalSettings(
        data=args.data, model=args.model, checkpoint=args.checkpoint, split=args.split, layout=args.layout,
        laclip=laclip, sweep_crops=args.sweep_crops, sweep_tau=args.sweep_tau,
        sweep_alpha=args.sweep_alpha, sweep_weights=args.sweep_weights, batch_size=args.batch_size,
        device=args.device, cache_dir=None if args.no_cache else args.cache_dir, skip_bad=args.skip_bad,
        rank_mode=rank_mode,
    )


def _cells(metrics: Metrics) -> str:
    t2i = " ".join(f"{metrics['text_to_image'][f'R@{k}']:6.2f}" for k in KS)
    i2t = " ".join(f"{metrics['image_to_text'][f'R@{k}']:6.2f}" for k in KS)
    return f"{t2i} | {i2t} | {metrics['MR']:6.2f}"


def _header() -> str:
    ks = " ".join(f"{f'R@{k}':>6}" for k in KS)
    return f"{'text->image':^20} | {'image->text':^20} |\n{ks} | {ks} | {'MR':>6}"


def format_report(report: EvalReport) -> str:
    """The side-by-side table (and the sweep table) as printed by the command."""
    m = report.meta
    lines = [f"{m['data']} split {m['split']} ({m['layout']} layout): {m['texts']} texts, {m['images']} images, "
             f"{m['image_queries']} image queries; model {m['model']}; features "
             f"{'from cache' if m['features_cached'] else 'encoded'}"]
    if m["laclip"]:
        c = LaclipConfig.from_dict(m["laclip"])
        lines.append(f"LACLIP: K={c.num_crops} {c.crop_mode} crops, tau={c.tau}, alpha={c.alpha}, "
                     f"weights={c.weights}, seed={c.seed}")
    head = _header().split("\n")
    lines += ["", f"{'':8}{head[0]}", f"{'mode':8}{head[1]}"]
    lines += [f"{mode:8}{_cells(metrics)}" for mode, metrics in report.results.items()]
    if report.sweep:
        lines += ["", f"{'K':>3} {'tau':>7} {'alpha':>6} {'weights':>7}  {head[0]}",
                  f"{'':28}{head[1]}"]
        lines += [f"{c.num_crops:>3} {c.tau:>7g} {c.alpha:>6g} {c.weights:>7}  {_cells(metrics)}"
                  for c, metrics in report.sweep]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        report = evaluate(settings)
    except EngineError as exc:
        return report_error(exc)
    if report.skipped:
        print(f"skipped {bad_records(len(report.skipped))}:", file=sys.stderr)
        for problem in report.skipped:
            print(f"  {problem}", file=sys.stderr)
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_json(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if report.rankings is not None:
        t2i, i2t = write_predictions(report.rankings, args.predictions)
        print(f"wrote {settings.rank_mode} rankings: {t2i} (text->image), {i2t} (image->text)")
        problem = unscorable_by_cn_clip(report.rankings)
        if problem:
            print(f"note: cn_clip's evaluation.py will refuse these files: {problem}", file=sys.stderr)
    return 0
