"""`python -m benchmarks [--quick] [--out DIR] [--only machine,towers,...]`: run the suite, then write
DIR/report.md, DIR/results.json and the plots."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.report import build_report
from benchmarks.runner import SUBJECTS, RunConfig, run_suite
from engine.errors import InputError
from engine.install_hints import require


def main(argv: list[str] | None = None) -> int:
    """Run the chosen subjects (each in its own process) and write DIR/report.md, results.json and plots."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller parameter lists (BENCH_QUICK=1), ~10 min")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default bench-out/quick or full)")
    parser.add_argument("--only", default=",".join(SUBJECTS),
                        help=f"comma-separated subjects to run (default all: {','.join(SUBJECTS)})")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget of the whole suite (default 600 quick, 3000 full)")
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    out = args.out or Path("bench-out") / ("quick" if args.quick else "full")
    try:
        require(("pytest_benchmark", "matplotlib"), "bench", "python -m benchmarks (its runs and plots)")
        cfg = RunConfig(out=out, quick=args.quick, only=only, budget_s=args.budget_s)
    except (InputError, ValueError) as exc:
        parser.error(str(exc))
    runs = run_suite(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
    report = build_report(out)
    print(f"report: {report}")
    return 0 if all(run.status in ("ok", "missing") for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
