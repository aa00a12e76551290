"""Turn one suite run (DIR/runs.json + DIR/raw/*) into DIR/report.md, DIR/results.json and PNG plots.

Every figure is shown with its ratio to the PyTorch reference measured in the same run (speed-up = reference
time / time), throughput also as a fraction of the machine limit measured by the machine subject, and every
skipped case with its reason. Re-render an existing run with `python -m benchmarks.report DIR`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.runner import REPO, RUNS_FILE

IMPL_KEYS = ("impl", "backend", "runtime", "engine", "variant", "provider")
REFERENCE_VALUES = {"reference", "torch", "pytorch", "torch-fp32", "torch_fp32", "pytorch-fp32", "torch-eager",
                    "eager", "max-batch-1"}
PRECISION_KEYS = ("precision", "dtype")
BATCH_KEYS = ("batch", "batch_size", "bs")
GALLERY_KEYS = ("n", "gallery", "gallery_size")
SKIP_EXTRA = {"threads", "seconds_min", "machine_gemm_gflops", "machine_read_gbs", "reference"}
PACKAGES = ("torch", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "cn_clip", "pytest-benchmark",
            "fastapi", "uvicorn", "matplotlib")
LIMITS_GROUP = "machine limits"
SCHEMA = 1


@dataclass
class Bench:
    """One pytest-benchmark case: its parameters, extra_info and timing statistics (seconds)."""

    name: str
    group: str | None
    params: dict[str, Any]
    extra: dict[str, Any]
    min_s: float
    median_s: float
    rounds: int


@dataclass
class Table:
    """Rows (dicts keyed by column id) with ordered (id, header) columns, as written to results.json."""

    columns: list[tuple[str, str]]
    rows: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------- machine and versions

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return None


def gpu_info() -> dict[str, Any] | None:
    """The CUDA devices torch sees ({"count", "names", "cuda"}), or None when no GPU is available."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"count": len(names), "names": names, "cuda": torch.version.cuda}


def machine_info() -> dict[str, Any]:
    """The machine this report describes: CPU model, cores, memory, OS, Python, torch threads, GPU."""
    try:
        import torch
        threads = torch.get_num_threads()
    except ImportError:
        threads = None
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "memory_gib": _memory_gib(),
            "os": platform.platform(), "python": platform.python_version(), "torch_threads": threads,
            "gpu": gpu_info()}


def backends() -> list[dict[str, Any]]:
    """Which fast paths this run could time, each with the reason when it could not (absent backends are listed,
    never silently dropped)."""
    import torch

    def row(name: str, ok: bool, why: str) -> dict[str, Any]:
        return {"backend": name, "available": ok, "reason": "" if ok else why}

    cuda = torch.cuda.is_available()
    try:
        import onnxruntime
        providers = onnxruntime.get_available_providers()
    except ImportError:
        providers = []
    try:
        from engine import ops
        ext, ext_cuda = ops.extension_available(), ops.cuda_available()
    except ImportError:
        ext, ext_cuda = False, False
    trt = importlib.util.find_spec("tensorrt") is not None
    return [row("PyTorch CPU fp32 (reference)", True, ""),
            row("PyTorch CUDA fp32/fp16", cuda, "no GPU (torch.cuda.is_available() is False)"),
            row("ONNX Runtime CPU", "CPUExecutionProvider" in providers, "onnxruntime not installed"),
            row("ONNX Runtime CUDA", "CUDAExecutionProvider" in providers and cuda,
                "no CUDAExecutionProvider" if cuda else "no GPU"),
            row("TensorRT", trt and cuda, "no GPU" if not cuda else "tensorrt not installed"),
            row("LACLIP kernel CPU", ext, "engine._laclip_ext not built (pip install --no-build-isolation -e .)"),
            row("LACLIP kernel CUDA", ext_cuda, "no GPU" if not cuda else "extension built without CUDA")]


def versions() -> dict[str, str | None]:
    """Installed versions of the packages the figures depend on (None: not installed)."""
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    try:
        found["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                             text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        found["git_commit"] = None
    return found


# ---------------------------------------------------------------- raw results

def load_benchmarks(path: Path) -> list[Bench]:
    """The cases of a pytest-benchmark JSON file, or of a benchmarks.partial JSON-lines file."""
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        cases = [r for r in records if r.get("kind") == "benchmark"]
    else:
        cases = json.loads(path.read_text()).get("benchmarks", [])
    benches = []
    for b in cases:
        s = b["stats"]
        benches.append(Bench(b["name"], b.get("group"), dict(b.get("params") or {}), dict(b.get("extra_info") or {}),
                             s["min"], s["median"], s["rounds"]))
    return benches


def load_junit(path: Path) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(skipped, failed) cases of a JUnit XML file, each {"test", "reason"|"message"}."""
    skipped, failed = [], []
    for case in ET.parse(path).getroot().iter("testcase"):
        test = case.get("name", "?")
        for child in case:
            message = (child.get("message") or (child.text or "")).strip().splitlines()
            first = message[0] if message else ""
            if child.tag == "skipped":
                skipped.append({"test": test, "reason": first.removeprefix("Skipped: ")})
            elif child.tag in ("failure", "error"):
                failed.append({"test": test, "message": first[:300]})
    return skipped, failed


# ---------------------------------------------------------------- reference pairing and derived figures

def _impl_key(b: Bench) -> str | None:
    return next((k for k in IMPL_KEYS if k in b.params), None)


def impl_label(b: Bench) -> str:
    """The implementation a case times: its impl/backend parameter (with precision when separate)."""
    key = _impl_key(b)
    label = str(b.extra.get("impl") or (b.params[key] if key else b.name))
    return f"{label} {b.params['precision']}" if key and "precision" in b.params else label


def is_reference(b: Bench) -> bool:
    """The PyTorch reference: extra_info reference=True, or an impl/backend value naming torch / the reference."""
    if "reference" in b.extra:
        return bool(b.extra["reference"])
    key = _impl_key(b)
    if key is None or str(b.params[key]).lower() not in REFERENCE_VALUES:
        return False
    precision = b.params.get("precision")
    return precision is None or str(precision).lower() in ("fp32", "float32")


def reference_for(b: Bench, benches: list[Bench]) -> Bench | None:
    """The reference case measured beside `b`: the one reference in its group, else the one with the same other
    parameters (ignoring precision/dtype when needed)."""
    refs = [r for r in benches if is_reference(r)]
    if b.group:
        same = [r for r in refs if r.group == b.group]
        if len(same) == 1:
            return same[0]
    key = _impl_key(b)
    for drop in ({key}, {key, *PRECISION_KEYS}):
        def rest(x: Bench) -> dict[str, Any]:
            return {k: v for k, v in x.params.items() if k not in drop}
        same = [r for r in refs if rest(r) == rest(b)]
        if len(same) == 1:
            return same[0]
    return None


def throughput(b: Bench) -> tuple[float | None, str]:
    """(items/s, unit): an extra_info "*_per_s" figure if the case gives one, else batch size / best time."""
    for key, value in b.extra.items():
        if key.endswith("_per_s") and isinstance(value, (int, float)):
            return float(value), key.removesuffix("_per_s").replace("_", " ") + "/s"
    batch = next((b.params[k] for k in BATCH_KEYS if k in b.params), None)
    if isinstance(batch, (int, float)) and b.min_s > 0:
        return batch / b.min_s, "items/s"
    return None, ""


def limit_fraction(b: Bench, items_per_s: float | None, limits: dict[str, float]) -> float | None:
    """Fraction of the machine's fp32 GEMM rate: the case's own extra_info gemm_fraction (limit measured in its
    process, closest in time), else its gflops, or gflop per item x items/s, over the suite's machine subject."""
    if isinstance(b.extra.get("gemm_fraction"), (int, float)):
        return b.extra["gemm_fraction"]
    gemm = limits.get("gemm_gflops")
    per_item = b.extra.get("gflop_per_item", b.extra.get("gflops_per_item"))
    if gemm and isinstance(b.extra.get("gflops"), (int, float)):
        return b.extra["gflops"] / gemm
    if gemm and isinstance(per_item, (int, float)) and items_per_s:
        return per_item * items_per_s / gemm
    return None


def _plain(value: Any) -> Any:
    """A JSON- and table-friendly parameter value ("torch.float32" -> "float32")."""
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    text = str(value)
    if text.startswith("UNSERIALIZABLE[") and text.endswith("]"):  # pytest-benchmark's repr of e.g. torch dtypes
        text = text[len("UNSERIALIZABLE["):-1]
    return text.removeprefix("torch.")


# ---------------------------------------------------------------- subject tables

def machine_table(benches: list[Bench]) -> tuple[Table, dict[str, float]]:
    """The machine limits table and the limits dict used as denominators."""
    table = Table([("limit", "limit"), ("value", "value"), ("unit", "unit"), ("size", "size"),
                   ("threads", "threads"), ("min_ms", "timed call ms")])
    limits: dict[str, float] = {}
    keys = {"fp32 GEMM": "gemm_gflops", "fp32 GEMM, 1 thread": "gemm_gflops_1thread", "memory read": "read_gbs",
            "memory copy": "copy_gbs"}
    for b in benches:
        name = b.extra.get("limit", b.name)
        size = f"n={b.extra['n']}" if "n" in b.extra else f"{b.extra['mib']} MiB" if "mib" in b.extra else ""
        table.rows.append({"limit": name, "value": b.extra.get("value"), "unit": b.extra.get("unit", ""),
                           "size": size, "threads": b.extra.get("threads"), "min_ms": b.min_s * 1e3})
        if name in keys and isinstance(b.extra.get("value"), (int, float)):
            limits[keys[name]] = float(b.extra["value"])
    return table, limits


def bench_table(benches: list[Bench], limits: dict[str, float]) -> Table:
    """One row per case: parameters, implementation, times, speed-up vs the reference, throughput, fraction of
    the machine limit, and every numeric extra_info figure."""
    param_keys = [k for k in dict.fromkeys(k for b in benches for k in b.params) if k not in IMPL_KEYS]
    if len({_test_function(b) for b in benches}) > 1:  # e.g. test_vision and test_text in one file
        param_keys.insert(0, "test")
    extra_keys = [k for k in dict.fromkeys(k for b in benches for k in b.extra)
                  if k not in SKIP_EXTRA and not k.endswith("_per_s") and k != "gemm_fraction"
                  and all(isinstance(b.extra.get(k), (int, float, type(None))) for b in benches)]
    has_tp = any(throughput(b)[0] is not None for b in benches)
    columns = [("case", "case") if not param_keys else None, *[(k, k) for k in param_keys], ("impl", "impl"),
               ("min_ms", "min ms"), ("median_ms", "median ms"), ("rounds", "rounds"),
               ("speedup", "speed-up vs reference"),
               ("reference", "reference")]
    if has_tp:
        columns += [("throughput", "throughput"), ("throughput_unit", "unit")]
    columns += [("limit_fraction", "of fp32 GEMM peak"), *[(k, k) for k in extra_keys]]
    table = Table([c for c in columns if c is not None])
    for b in benches:
        ref = reference_for(b, benches)
        tp, unit = throughput(b)
        row: dict[str, Any] = {"case": b.name} if not param_keys else {}
        row.update({k: _plain(b.params.get(k)) for k in param_keys})
        if "test" in param_keys:
            row["test"] = _test_function(b).removeprefix("test_")
        row.update({"impl": impl_label(b), "min_ms": b.min_s * 1e3, "median_ms": b.median_s * 1e3, "rounds": b.rounds,
                    "speedup": ref.min_s / b.min_s if ref and b.min_s > 0 else None,
                    "reference": impl_label(ref) if ref else None, "limit_fraction": limit_fraction(b, tp, limits)})
        if has_tp:
            row.update({"throughput": tp, "throughput_unit": unit})
        row.update({k: b.extra.get(k) for k in extra_keys})
        table.rows.append(row)
    if all(r["limit_fraction"] is None for r in table.rows):
        table.columns.remove(("limit_fraction", "of fp32 GEMM peak"))
    if len({r["reference"] for r in table.rows}) == 1:  # one reference for all: named in the note instead
        table.columns.remove(("reference", "reference"))
    return table


def _test_function(b: Bench) -> str:
    return b.name.split("[", 1)[0]


def constant_settings(benches: list[Bench]) -> dict[str, Any]:
    """Non-numeric extra_info values shared by every case (e.g. the model, the CPU code path)."""
    keys = [k for k in dict.fromkeys(k for b in benches for k in b.extra) if k not in SKIP_EXTRA]
    settings = {}
    for k in keys:
        values = {json.dumps(b.extra.get(k), default=str) for b in benches}
        if len(values) == 1 and isinstance(benches[0].extra.get(k), str):
            settings[k] = benches[0].extra[k]
    return settings


def serve_table(data: dict[str, Any]) -> Table:
    """The serving benchmark's points with p99/p50 and speed-up over max batch 1 at the same concurrency."""
    table = Table([("clients", "clients"), ("mode", "mode"), ("requests", "requests"), ("qps", "queries/s"),
                   ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("p99_over_p50", "p99/p50"),
                   ("mean_batch", "mean batch"), ("speedup", "speed-up vs max batch 1")])
    points = data.get("points", [])
    base = {p["clients"]: p["qps"] for p in points if p["mode"] == "max-batch-1"}
    for p in points:
        table.rows.append({"clients": p["clients"], "mode": p["mode"], "requests": p["requests"], "qps": p["qps"],
                           "p50_ms": p["p50_ms"], "p99_ms": p["p99_ms"],
                           "p99_over_p50": p["p99_ms"] / p["p50_ms"] if p["p50_ms"] else None,
                           "mean_batch": p.get("mean_batch"),
                           "speedup": p["qps"] / base[p["clients"]] if base.get(p["clients"]) else None})
    return table


# ---------------------------------------------------------------- plots

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
    batch = next((k for k in BATCH_KEYS if k in ids), None)
    if batch and "throughput" in ids:
        return _line_plot(out / f"{name}_throughput.png", table.rows, batch, [("throughput", "-")], ["impl"],
                          [k for k in param_ids if k != batch], "batch size", "items/s",
                          f"{name}: throughput vs batch size per backend", logy=True)
    gallery = next((k for k in GALLERY_KEYS if k in ids), None)
    if gallery:
        return _line_plot(out / f"{name}_time.png", table.rows, gallery, [("min_ms", "-")],
                          ["impl", *[k for k in param_ids if k in ("weights", "op")]],
                          [k for k in param_ids if k not in (gallery, "weights", "op")], "gallery size (images)",
                          "time per call (ms)", f"{name}: time vs gallery size", logy=True)
    return None


# ---------------------------------------------------------------- assemble

def collect(out: Path) -> dict[str, Any]:
    """results.json content for the run in `out`."""
    runs_path = out / RUNS_FILE
    if not runs_path.is_file():
        raise FileNotFoundError(f"{runs_path} not found: run `python -m benchmarks --out {out}` first")
    runs = json.loads(runs_path.read_text())
    subjects: dict[str, Any] = {}
    limits: dict[str, float] = {}
    for run in sorted(runs["subjects"], key=lambda r: r["name"] != "machine"):  # limits first: the denominators
        entry = {k: run.get(k) for k in ("file", "kind", "status", "seconds", "returncode", "selection", "reason")}
        entry["command"] = " ".join(shlex.quote(_short(a)) for a in run.get("command") or [])
        skipped, failed = load_junit(Path(run["junit_path"])) if run.get("junit_path") else ([], [])
        partial = Path(run["partial_path"]) if run.get("partial_path") else None
        if partial and not run.get("junit_path"):  # stopped before the end: skips recorded case by case
            records = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
            skipped = [{"test": r["test"], "reason": r["reason"]} for r in records if r.get("kind") == "skipped"]
        if run["status"] == "missing":
            skipped.append({"test": run["file"], "reason": run["reason"]})
        table = Table([])
        source = run.get("json_path") or (str(partial) if partial else None)
        if source:
            data = {} if source.endswith(".jsonl") else json.loads(Path(source).read_text())
            if "points" in data:
                table = serve_table(data)
                entry["settings"] = data.get("args", {})
            else:
                benches = load_benchmarks(Path(source))
                if run["name"] == "machine":
                    table, limits = machine_table(benches)
                else:
                    own = [b for b in benches if b.group == LIMITS_GROUP]  # a bench file's in-process limits
                    benches = [b for b in benches if b.group != LIMITS_GROUP]
                    if own:
                        entry["own_limits"] = {k: v for b in own for k, v in b.extra.items()
                                               if isinstance(v, (int, float)) and k != "threads"}
                    if benches:
                        table = bench_table(benches, limits)
                        entry["settings"] = constant_settings(benches)
        if run["status"] in ("failed", "timeout") and run.get("log_path") and Path(run["log_path"]).is_file():
            entry["log_tail"] = Path(run["log_path"]).read_text(errors="replace").splitlines()[-15:]
        entry.update({"columns": table.columns, "rows": table.rows, "skipped": skipped, "failed": failed})
        subjects[run["name"]] = entry
    machine = machine_info()
    machine["load_average"] = runs.get("load_average_at_start")
    finished = runs.get("finished") or dt.datetime.fromtimestamp(runs_path.stat().st_mtime, dt.timezone.utc).isoformat(
        timespec="seconds")
    return {"schema": SCHEMA, "created": finished, "started": runs.get("started"),
            "mode": "quick" if runs.get("quick") else "full", "machine": machine, "versions": versions(),
            "backends": backends(),
            "limits": limits, "subjects": subjects}


def _short(arg: str) -> str:
    """A command-line argument as a reader would type it (python, repository-relative paths)."""
    if arg == sys.executable:
        return "python"
    return arg.replace(f"{REPO}{os.sep}", "").replace(f"={REPO}", "=.")


def fmt(column: str, value: Any) -> str:
    """Table cell text: ratios as 1.23x, fractions as percentages, numbers to 3-4 significant digits."""
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value).replace("|", "\\|")
    if column == "speedup":
        return f"{value:.2f}x"
    if column.endswith("fraction"):
        return f"{value:.1%}" if value < 0.1 else f"{value:.0%}"
    if isinstance(value, int):
        return str(value)
    magnitude = abs(value)
    return f"{value:.0f}" if magnitude >= 100 else f"{value:.1f}" if magnitude >= 10 else f"{value:.2f}" \
        if magnitude >= 0.1 else f"{value:.3g}"


def markdown_table(columns: list[tuple[str, str]], rows: list[dict[str, Any]]) -> str:
    """A GitHub markdown table."""
    head = "| " + " | ".join(h for _, h in columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "\n".join("| " + " | ".join(fmt(c, r.get(c)) for c, _ in columns) + " |" for r in rows) + "\n"


def machine_name(results: dict[str, Any]) -> str:
    """"CPU model (N cores)" plus the GPU card when one was used."""
    m = results["machine"]
    name = f"{m['cpu']} ({m['cores']} cores, {m['memory_gib']} GiB)"
    return name + (f" + {', '.join(m['gpu']['names'])}" if m.get("gpu") else "")


def render_markdown(results: dict[str, Any], images: str = "", level: int = 1, title: bool = True) -> str:
    """The report as markdown; `images` prefixes plot file names, `level` is the top heading's level (sections
    one below it), `title` False leaves the top heading to the caller."""
    h = "#" * level
    m, v = results["machine"], results["versions"]
    gpu = m.get("gpu")
    lines = [f"{h} Benchmark report ({results['mode']} suite)", ""] if title else []
    lines += [f"Measured {results['created']} on **{machine_name(results)}**"
             f"{', commit ' + v['git_commit'] if v.get('git_commit') else ''}. Speed-up = time of the PyTorch "
             "reference measured in the same run / time of the case (above 1: faster). \"of fp32 GEMM peak\" is "
             "throughput as a fraction of the best fp32 GEMM rate measured in this run: by the bench file in its "
             "own process where it measures one (listed under its table, as are its other *_fraction columns' "
             "denominators), else by the machine subject.", "",
             f"{h}# Machine", "",
             markdown_table([("k", "item"), ("v", "value")], [
                 {"k": "CPU", "v": m["cpu"]}, {"k": "cores", "v": m["cores"]},
                 {"k": "memory", "v": f"{m['memory_gib']} GiB"}, {"k": "OS", "v": m["os"]},
                 {"k": "Python", "v": m["python"]}, {"k": "torch threads", "v": m["torch_threads"]},
                 {"k": "load average (1/5/15 min) at the start of the run",
                  "v": " / ".join(map(str, m["load_average"])) if m.get("load_average") else None},
                 {"k": "GPU", "v": ", ".join(gpu["names"]) + f" (CUDA {gpu['cuda']})" if gpu else "none"}]),
             f"{h}# Backends", "",
             "The fast paths this run could time; the bench files time every available one and skip the rest.", "",
             markdown_table([("backend", "backend"), ("available", "available"), ("reason", "skipped because")],
                            [{**r, "available": "yes" if r["available"] else "no"}
                             for r in results.get("backends", [])]),
             f"{h}# Versions", "",
             markdown_table([("k", "package"), ("v", "version")],
                            [{"k": k, "v": val or "not installed"} for k, val in v.items()]),
             f"{h}# Subjects", "",
             markdown_table([("name", "subject"), ("file", "file"), ("status", "status"), ("seconds", "seconds"),
                             ("n", "figures"), ("skipped", "skipped"), ("failed", "failed"), ("note", "note")],
                            [{"name": name, "file": s["file"], "status": s["status"], "seconds": s["seconds"],
                              "n": len(s["rows"]), "skipped": len(s["skipped"]), "failed": len(s["failed"]),
                              "note": "; ".join(filter(None, [s.get("reason"), s.get("selection") and (
                                  f"arguments: {s['selection']}" if s["kind"] == "script"
                                  else f"quick selection: -k '{s['selection']}'")]))}
                             for name, s in results["subjects"].items()])]
    for name, s in results["subjects"].items():
        lines += [f"{h}# {name}", "", f"`{s['command'] or s['file']}`: **{s['status']}**"
                  f"{' (' + s['reason'] + ')' if s.get('reason') else ''}.", ""]
        if s.get("settings"):
            lines += ["Settings: " + ", ".join(f"{k}={val}" for k, val in s["settings"].items() if k != "out"), ""]
        if s.get("own_limits"):
            lines += ["Machine limits measured in this subject's own process: " + ", ".join(
                f"{k}={fmt(k, val)}" for k, val in s["own_limits"].items()), ""]
        refs = {r.get("reference") for r in s["rows"]} if ("reference", "reference") not in map(tuple, s["columns"]) \
            else set()
        if len(refs) == 1 and None not in refs:
            lines += [f"Reference (speed-up 1.00x): `{refs.pop()}`, measured in the same process.", ""]
        if s["rows"]:
            lines.append(markdown_table([tuple(c) for c in s["columns"]], s["rows"]))
        for plot in s.get("plots", []):
            lines += [f"![{name}]({images}{plot})", ""]
        if s["skipped"]:
            lines += ["Skipped:", ""] + [f"- `{x['test']}`: {x['reason']}" for x in s["skipped"]] + [""]
        if s["failed"]:
            lines += ["Failed:", ""] + [f"- `{x['test']}`: {x['message']}" for x in s["failed"]] + [""]
        if s.get("log_tail"):
            lines += ["Last lines of its log:", "", "```", *s["log_tail"], "```", ""]
    lines += [f"{h}# GPU", "", f"Ran on {', '.join(gpu['names'])} (CUDA {gpu['cuda']})." if gpu
              else "No GPU available in this run: the CUDA backends are marked unavailable in the Backends table "
              "above.", ""]
    return "\n".join(lines)


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
