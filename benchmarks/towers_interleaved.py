"""Towers timed in rotation, for a shared machine: every implementation takes one turn per round (the fastest of a
few calls), in an order that rotates each round (engine.backends.candidate_timing.rotating_samples, the timing
`--precision auto` uses), and each is reported by its best and its median round as a ratio to PyTorch fp32 in the
same rounds. bench_towers times one row after another, so a slow minute on a noisy VM lands on whichever row ran then;
here it lands on every row alike.

Run:  python -m benchmarks.towers_interleaved --tower text --length 8 --batch 1 --rounds 25
      [--impls torch-fp32,torch-int8-text,onnx-int8,openvino-bf16,auto]
The encoders, the export and their parity are bench_towers' (same model, cache and BENCH_THREADS). The table is
printed and appended to bench-out/towers-interleaved.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engine.backends.candidate_timing import rotating_samples

REFERENCE = "torch-fp32"
OUT_PATH = Path(__file__).resolve().parent.parent / "bench-out" / "towers-interleaved.md"


@dataclass(frozen=True)
class Timing:
    """One implementation's rounds: best and median seconds, and both as a speed-up over the reference's."""

    best_s: float
    median_s: float
    best_ratio: float
    median_ratio: float


def ratios(samples: dict[str, list[float]], reference: str = REFERENCE) -> dict[str, Timing]:
    """Each entry's best and median, and its speed-up over `reference` (best over best, median over median)."""
    if reference not in samples:
        raise ValueError(f"the reference {reference!r} is not among {sorted(samples)}")
    ref_best, ref_median = min(samples[reference]), statistics.median(samples[reference])
    return {name: Timing(min(s), statistics.median(s), ref_best / min(s), ref_median / statistics.median(s))
            for name, s in samples.items()}


def table(timings: dict[str, Timing], parity: dict[str, tuple[float, float]], title: str) -> str:
    """A markdown table of `timings`, each row with its parity (min cosine, gate) where measured."""
    lines = [title, "", "| path | best ms | median ms | x ref (best) | x ref (median) | parity (gate) |",
             "|---|---|---|---|---|---|"]
    for name, t in timings.items():
        low, gate = parity.get(name, (None, None))
        cell = "reference" if name == REFERENCE else "-" if low is None else f"{low:.6f} ({gate})"
        lines.append(f"| {name} | {t.best_s * 1e3:.2f} | {t.median_s * 1e3:.2f} | {t.best_ratio:.2f}x | "
                     f"{t.median_ratio:.2f}x | {cell} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.towers_interleaved", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tower", choices=("vision", "text"), default="text")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=8, help="tokens per text (all real), text tower only")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--burst", type=int, default=3, help="calls per turn; the fastest is recorded")
    parser.add_argument("--impls", default="", help="comma-separated rows of bench_towers (default: every one "
                                                    "that runs here); torch-fp32 is always added")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.length < 2 or args.rounds < 1 or args.burst < 1:
        parser.error(f"--batch >= 1, --length >= 2, --rounds >= 1 and --burst >= 1, got {args.batch}, "
                     f"{args.length}, {args.rounds}, {args.burst}")
    from benchmarks import bench_towers as towers
    from engine.backends.cpu_features import cpu_info

    encoders = towers.build_encoders(towers.random_checkpoint())
    wanted = [n.strip() for n in args.impls.split(",") if n.strip()] or list(encoders)
    unknown = sorted(set(wanted) - set(towers.IMPLS))
    if unknown:
        parser.error(f"unknown --impls {unknown}; rows: {', '.join(towers.IMPLS)}")
    names = [REFERENCE, *(n for n in wanted if n != REFERENCE and n in encoders
                          and not (args.tower == "vision" and n == towers.TEXT_ONLY))]
    for name in sorted(set(wanted) - set(encoders)):
        print(f"skipped {name}: {towers.UNAVAILABLE.get(name, 'no encoder')}", file=sys.stderr)
    if args.tower == "vision":
        pixels = towers.bench_pixels(args.batch)
        calls = {n: (lambda e=encoders[n]: e.encode_images(pixels)) for n in names}
        case = f"vision batch {args.batch}"
    else:
        ids = towers.bench_ids(args.batch, args.length)
        calls = {n: (lambda e=encoders[n]: e.encode_texts(ids)) for n in names}
        case = f"text {args.length} tokens batch {args.batch}"
    timings = ratios(rotating_samples(calls, args.rounds, args.burst))
    cpu = cpu_info()
    title = (f"{case}, {args.rounds} rotating rounds of {args.burst}-call turns, {towers.THREADS} threads, {towers.MODEL} random weights, "
             f"{cpu.model} ({', '.join(cpu.flags)}); {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
             + (f"; auto serves {towers.AUTO_SERVED[0]}" if towers.AUTO_SERVED else ""))
    text = table(timings, towers.PARITY, title)
    print(text)
    OUT_PATH.parent.mkdir(parents=True, exist_ok=True)
    with OUT_PATH.open("a", encoding="utf-8") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
