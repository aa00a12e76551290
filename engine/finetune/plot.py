"""RUN_DIR/curves.png: training loss (raw and smoothed) and validation MR against the step."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError
from ..install_hints import install_command


def plot_curves(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Draw the log's step rows (loss) and validation rows (MR, global and LACLIP) into one PNG."""
    try:
        import matplotlib
    except ImportError as exc:
        raise InputError(f"the training plot needs matplotlib: {install_command('finetune')}") from exc
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps = [r for r in rows if "loss" in r]
    valid = [r for r in rows if "valid" in r]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    if steps:
        xs, ys = [r["step"] for r in steps], [r["loss"] for r in steps]
        top.plot(xs, ys, color="#9ecae1", linewidth=0.8, label="loss")
        top.plot(xs, _smooth(ys), color="#08519c", linewidth=1.5, label="loss (moving average)")
        top.legend(loc="upper right")
    top.set_ylabel("InfoNCE loss")
    for mode, colour in (("global", "#d94801"), ("laclip", "#238b45")):
        points = [(r["step"], r["valid"][mode]["MR"]) for r in valid if mode in r["valid"]]
        if points:
            bottom.plot(*zip(*points), marker="o", color=colour, label=f"validation MR ({mode})")
    if valid:
        bottom.legend(loc="lower right")
    bottom.set_ylabel("MR (%)")
    bottom.set_xlabel("step")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def _smooth(values: Sequence[float], window: int = 25) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
