"""Command line of `python -m engine.finetune` (run it under `torchrun --nproc-per-node N` for several devices)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..cli_common import report_error
from ..errors import EngineError
from ..laclip import LaclipConfig
from ..models import available_models
from .config import FinetuneConfig
from .train import FinetuneResult, finetune, resume

_D = FinetuneConfig.__dataclass_fields__
# Only these may be given with --resume: they change where and how fast the run goes, not its result.
_RESUME_OPTIONS = ("device", "num_workers", "threads", "stop_after_steps", "progress")


def _default(name: str) -> object:
    return _D[name].default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.finetune", description=__doc__)
    run = p.add_argument_group("run")
    run.add_argument("--model", choices=available_models(), help="cn_clip structure (required for a new run)")
    run.add_argument("--checkpoint", type=Path, help="starting weights (cn_clip format); default: official weights")
    run.add_argument("--random-weights", action="store_true", help="start from seeded random weights (trials)")
    run.add_argument("--data", type=Path, help="dataset folder, the layouts python -m engine.eval reads")
    run.add_argument("--train-split", default=_default("train_split"))
    run.add_argument("--valid-split", default=_default("valid_split"), help="'none' for no validation")
    run.add_argument("--layout", choices=["auto", "tsv", "folder"], default="auto")
    run.add_argument("--skip-bad", action="store_true", help="skip bad records (each reported) instead of failing")
    run.add_argument("--out", type=Path, help="run folder (must not hold a run)")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue RUN_DIR exactly where it stopped")
    recipe = p.add_argument_group("recipe (defaults: CE-CLIP Table 2 where it gives a value)")
    recipe.add_argument("--stage1-steps", type=int, default=_default("stage1_steps"),
                        help="steps with the vision tower frozen")
    recipe.add_argument("--stage2-steps", type=int, default=_default("stage2_steps"), help="steps training both")
    recipe.add_argument("--stage1-epochs", type=int, help="stage 1 length in epochs (overrides --stage1-steps)")
    recipe.add_argument("--stage2-epochs", type=int, help="stage 2 length in epochs (overrides --stage2-steps)")
    recipe.add_argument("--batch-size", type=int, default=_default("batch_size"), help="global batch (all ranks)")
    recipe.add_argument("--lr", type=float, default=_default("lr"))
    recipe.add_argument("--weight-decay", type=float, default=_default("weight_decay"))
    recipe.add_argument("--warmup", type=int, default=_default("warmup_steps"), help="warm-up steps per stage")
    recipe.add_argument("--grad-clip", type=float, help="clip the global gradient norm to this value")
    recipe.add_argument("--context-length", type=int, default=_default("context_length"))
    recipe.add_argument("--dropout", type=float, help="override the text tower's dropout (default: the model's)")
    recipe.add_argument("--seed", type=int, default=_default("seed"))
    memory = p.add_argument_group("memory and speed")
    memory.add_argument("--grad-cache-chunk", type=int, help="gradient caching with this many pairs per chunk")
    memory.add_argument("--grad-checkpointing", action="store_true")
    memory.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                        help="auto: bf16 autocast on GPU, fp32 on CPU")
    memory.add_argument("--device", help="cpu or cuda (under torchrun each rank takes cuda:LOCAL_RANK)")
    memory.add_argument("--num-workers", type=int, help="image decoding worker processes (default 0)")
    memory.add_argument("--threads", type=int, help="CPU torch threads per rank (default: $OMP_NUM_THREADS, else the "
                                                    "cores the machine's load leaves free less one, at most 4)")
    valid = p.add_argument_group("validation and checkpoints")
    valid.add_argument("--valid-every", type=int, default=_default("valid_every"),
                       help="validate (and save) every N steps; also at step 0, the end of stage 1 and the end")
    valid.add_argument("--valid-batch-size", type=int, default=_default("valid_batch_size"))
    valid.add_argument("--valid-crops", type=int, default=0, help="also report LACLIP with K crops (0: global only)")
    valid.add_argument("--valid-crop-mode", choices=["random", "grid"], default=LaclipConfig.crop_mode)
    valid.add_argument("--valid-tau", type=float, default=LaclipConfig.tau)
    valid.add_argument("--valid-alpha", type=float, default=LaclipConfig.alpha)
    valid.add_argument("--valid-weights", choices=["image", "text"], default=LaclipConfig.weights)
    valid.add_argument("--early-stop", type=int, help="stop after N validations without a better MR")
    valid.add_argument("--save-every", type=int, help="also save epoch_latest.pt every N steps")
    valid.add_argument("--stop-after-steps", type=int, help="end this invocation at this step (continue with --resume)")
    progress = valid.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None)
    progress.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> FinetuneConfig:
    missing = [flag for flag, value in (("--model", args.model), ("--data", args.data), ("--out", args.out))
               if value is None]
    if missing:
        parser.error(f"a new run needs {', '.join(missing)} (or --resume RUN_DIR)")
    laclip = None
    if args.valid_crops:
        laclip = LaclipConfig(num_crops=args.valid_crops, crop_mode=args.valid_crop_mode, tau=args.valid_tau,
                              alpha=args.valid_alpha, weights=args.valid_weights)
    return FinetuneConfig(
        model=args.model, data=args.data, out=args.out, checkpoint=args.checkpoint,
        random_weights=args.random_weights, train_split=args.train_split,
        valid_split=None if args.valid_split.lower() == "none" else args.valid_split, layout=args.layout,
        skip_bad=args.skip_bad, stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps,
        stage1_epochs=args.stage1_epochs, stage2_epochs=args.stage2_epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup, grad_clip=args.grad_clip,
        context_length=args.context_length, dropout=args.dropout, grad_cache_chunk=args.grad_cache_chunk,
        grad_checkpointing=args.grad_checkpointing, precision=args.precision, device=args.device or "cpu",
        num_workers=args.num_workers or 0, threads=args.threads, seed=args.seed, valid_every=args.valid_every,
        valid_batch_size=args.valid_batch_size, laclip=laclip, early_stop=args.early_stop,
        save_every=args.save_every, stop_after_steps=args.stop_after_steps, progress=args.progress,
    )


def _resume_conflicts(argv: Sequence[str]) -> list[str]:
    """Options given with --resume that would change the run's result (they are fixed by its config.json)."""
    allowed = {"--resume", *(f"--{name.replace('_', '-')}" for name in _RESUME_OPTIONS), "--no-progress"}
    flags = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return sorted(flags - allowed)


def summary(result: FinetuneResult) -> str:
    lines = [f"run {result.run_dir}: step {result.step}/{result.total_steps}"
             + (" (stopped early: no better validation MR)" if result.stopped_early else "")]
    if result.best_mr is not None:
        lines.append(f"best validation MR {result.best_mr:.2f} at step {result.best_step}: {result.best}")
    if result.last_validation is not None:
        g = result.last_validation["global"]
        lines.append(f"last validation: text->image R@1 {g['text_to_image']['R@1']:.2f}, image->text R@1 "
                     f"{g['image_to_text']['R@1']:.2f}, MR {g['MR']:.2f}")
    lines.append(f"latest checkpoint: {result.latest}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.resume is not None:
            conflicts = _resume_conflicts(argv)
            if conflicts:
                parser.error(f"{', '.join(conflicts)} cannot change a run; --resume takes them from "
                             f"{args.resume}/config.json (allowed: --device, --num-workers, --threads, "
                             "--stop-after-steps)")
            result = resume(args.resume, stop_after_steps=args.stop_after_steps, device=args.device,
                            num_workers=args.num_workers, threads=args.threads, progress=args.progress)
        else:
            result = finetune(config_from_args(args, parser))
    except EngineError as exc:
        return report_error(exc)
    print(summary(result))
    return 0
