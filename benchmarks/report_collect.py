"""Benchmark report, collect: read one suite run (DIR/runs.json + DIR/raw/*) into the results.json structure,
with the machine, the backends this run could time, and the package versions."""
from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import platform
import shlex
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from benchmarks.report_tables import (LIMITS_GROUP, Bench, Table, bench_table, constant_settings, machine_table,
                                      rows_table, serve_table)
from benchmarks.runner import REPO, RUNS_FILE, git_commit
from engine.backends.cpu_features import cpu_info
from engine.backends.versions import RUNTIME_PACKAGES, package_versions

PACKAGES = (*RUNTIME_PACKAGES, "pytest-benchmark", "fastapi", "uvicorn", "matplotlib")
SCHEMA = 1

# ---------------------------------------------------------------- machine and versions

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
    """The machine this report describes: CPU model and ISA flags, cores, memory, OS, Python, torch threads, GPU."""
    try:
        import torch
        threads = torch.get_num_threads()
    except ImportError:
        threads = None
    cpu = cpu_info()
    return {"cpu": cpu.model, "cpu_flags": list(cpu.flags), "cores": os.cpu_count(), "memory_gib": _memory_gib(),
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


def versions(commit: str | None) -> dict[str, str | None]:
    """Installed versions of the packages the figures depend on (None: not installed), and the commit run."""
    return {**package_versions(PACKAGES), "git_commit": commit}


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
            if "points" in data:  # the serving benchmark's (with clients), or a script's own measured points
                serving = all("clients" in point for point in data["points"])
                table = serve_table(data) if serving else rows_table(data["points"])
                entry["settings"] = data.get("args", {})
            elif isinstance(data.get("rows"), list):
                table = rows_table(data["rows"])
                entry["settings"] = data.get("settings", data.get("args", {}))
            elif data and "benchmarks" not in data:  # one summary (the soak): its scalar figures as one row
                table = rows_table([{k: v for k, v in data.items() if isinstance(v, (int, float, str, bool))}])
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
            "mode": "quick" if runs.get("quick") else "full", "machine": machine, "versions": versions(runs.get("git_commit") or git_commit()),
            "backends": backends(),
            "limits": limits, "subjects": subjects}


def _short(arg: str) -> str:
    """A command-line argument as a reader would type it (python, repository-relative paths)."""
    if arg == sys.executable:
        return "python"
    return arg.replace(f"{REPO}{os.sep}", "").replace(f"={REPO}", "=.")

