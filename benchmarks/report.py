"""Turn one suite run (DIR/runs.json + DIR/raw/*) into DIR/report.md, DIR/results.json and PNG plots.

Every figure is shown with its ratio to the PyTorch reference measured in the same run (speed-up = reference
time / time), throughput also as a fraction of the machine limit measured by the machine subject, and every
skipped case with its reason. Re-render an existing run with `python -m benchmarks.report DIR`. The work is split
by job: benchmarks.report_collect (read the run), report_tables (pair and tabulate), report_plots, report_render.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.report_collect import collect
from benchmarks.report_plots import subject_plot
from benchmarks.report_render import render_markdown
from benchmarks.report_tables import Table

def build_report(out: Path) -> Path:
    """Write out/results.json, out/report.md and the plots for the run recorded in `out`; returns report.md."""
    out = Path(out)
    results = collect(out)
    for name, s in results["subjects"].items():
        plot = subject_plot(name, Table([tuple(c) for c in s["columns"]], s["rows"]), out) if s["rows"] else None
        s["plots"] = [plot.name] if plot else []
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    report = out / "report.md"
    report.write_text(render_markdown(results))
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI: re-render the report of an existing run folder."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    parser.add_argument("dir", type=Path, help="folder written by `python -m benchmarks --out DIR`")
    args = parser.parse_args(argv)
    try:
        print(build_report(args.dir))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
