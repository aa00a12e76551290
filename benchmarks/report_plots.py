"""Benchmark report, plots: one PNG per subject (throughput vs batch, time vs gallery size, latency vs clients)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.report_tables import BATCH_KEY, GALLERY_KEY, Table

def _line_plot(path: Path, rows: list[dict[str, Any]], x: str, ys: list[tuple[str, str]], series: list[str],
               panels: list[str], xlabel: str, ylabel: str, title: str, logy: bool = False) -> Path | None:
    """One panel per distinct value of `panels`, one line per `series` value and y column (y's line style; a
    reference series dashed, in the colour of the case it is the reference for); None when nothing to plot."""
    rows = [r for r in rows if isinstance(r.get(x), (int, float)) and any(r.get(y) is not None for y, _ in ys)]
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    def panel_of(r: dict[str, Any]) -> str:
        return ", ".join(str(r[k]) if k == "test" else f"{k}={r[k]}" for k in panels if r.get(k) is not None)

    def label_of(r: dict[str, Any]) -> str:
        return " ".join(str(r.get(k)) for k in series)

    def colour_of(r: dict[str, Any]) -> str:
        return " ".join(str(r.get(k)) for k in series if k != "impl") or str(r.get("impl"))

    colours = {c: f"C{i % 10}" for i, c in enumerate(dict.fromkeys(colour_of(r) for r in rows))}
    names = list(dict.fromkeys(panel_of(r) for r in rows))
    cols = min(len(names), 3)
    nrows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.9 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        sub = [r for r in rows if panel_of(r) == name]
        for label in dict.fromkeys(label_of(r) for r in sub):
            line = sorted((r for r in sub if label_of(r) == label), key=lambda r: r[x])
            for y, style in ys:
                pts = [(r[x], r[y]) for r in line if r.get(y) is not None]
                if not pts:
                    continue
                dashed = "impl" in series and "reference" in str(line[0].get("impl", "")).lower()
                suffix = f" {y.removesuffix('_ms')}" if len(ys) > 1 else ""
                ax.plot(*zip(*pts), "--" if dashed else style, color=colours[colour_of(line[0])], marker="o",
                        label=f"{label}{suffix}")
        ax.set_title(name or title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xscale("log")
        ax.set_xticks(sorted({r[x] for r in sub}))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        if logy:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if len(names) > 1 or names[0]:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def subject_plot(name: str, table: Table, out: Path) -> Path | None:
    """The subject's plot: throughput vs batch (towers), time vs gallery size (kernel), latency vs clients (serve)."""
    ids = [c for c, _ in table.columns]
    param_ids = [c for c in ids if c not in ("case", "impl", "min_ms", "median_ms", "rounds", "speedup", "reference",
                                            "throughput", "throughput_unit", "limit_fraction")
                 and all(not isinstance(r.get(c), float) for r in table.rows)]
    if name == "serve":
        return _line_plot(out / "serve_latency.png", table.rows, "clients", [("p50_ms", "-"), ("p99_ms", "--")],
                          ["mode"], [], "concurrent clients", "latency (ms)", "Serving: latency percentiles vs "
                          "concurrency", logy=True)
    batch = BATCH_KEY if BATCH_KEY in ids else None
    if batch and "throughput" in ids:
        return _line_plot(out / f"{name}_throughput.png", table.rows, batch, [("throughput", "-")], ["impl"],
                          [k for k in param_ids if k != batch], "batch size", "items/s",
                          f"{name}: throughput vs batch size per backend", logy=True)
    gallery = GALLERY_KEY if GALLERY_KEY in ids else None
    if gallery:
        return _line_plot(out / f"{name}_time.png", table.rows, gallery, [("min_ms", "-")],
                          ["impl", *[k for k in param_ids if k in ("weights", "op")]],
                          [k for k in param_ids if k not in (gallery, "weights", "op")], "gallery size (images)",
                          "time per call (ms)", f"{name}: time vs gallery size", logy=True)
    return None

