"""Benchmark report, tables: pair each case with the reference measured beside it and lay out one table per subject.

Naming convention (the one the bench files use): a case names its implementation in the `impl` parameter, and
the reference is `impl="reference"` or `impl="torch-fp32"` (or extra_info reference=True); batch size is the
`batch` parameter, gallery size `n`, precision `dtype`. A script-style subject's JSON gives either
pytest-benchmark's "benchmarks", "points" (the serving benchmark's, with "clients"; or a script's own
measured points, shown as rows), plain "rows" (a list of flat dicts), or one summary object (the soak's: its
scalar figures become one row).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

IMPL_KEY = "impl"
REFERENCE_VALUES = {"reference", "torch-fp32"}
PRECISION_KEY = "dtype"
BATCH_KEY = "batch"
GALLERY_KEY = "n"
SKIP_EXTRA = {"threads", "seconds_min", "machine_gemm_gflops", "machine_read_gbs", "reference"}
LIMITS_GROUP = "machine limits"


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


# ---------------------------------------------------------------- reference pairing and derived figures

def _impl_key(b: Bench) -> str | None:
    return IMPL_KEY if IMPL_KEY in b.params else None


def impl_label(b: Bench) -> str:
    """The implementation a case times: its impl parameter (extra_info "impl" wins), else the case name."""
    key = _impl_key(b)
    return str(b.extra.get("impl") or (b.params[key] if key else b.name))


def is_reference(b: Bench) -> bool:
    """The reference: extra_info reference=True, or an impl of REFERENCE_VALUES (at fp32 when a dtype is given)."""
    if "reference" in b.extra:
        return bool(b.extra["reference"])
    key = _impl_key(b)
    if key is None or str(b.params[key]).lower() not in REFERENCE_VALUES:
        return False
    precision = b.params.get(PRECISION_KEY)
    return precision is None or str(precision).lower() in ("fp32", "float32")


def reference_for(b: Bench, benches: list[Bench]) -> Bench | None:
    """The reference case measured beside `b`: the one reference in its group, else the one with the same other
    parameters (ignoring the dtype when needed)."""
    refs = [r for r in benches if is_reference(r)]
    if b.group:
        same = [r for r in refs if r.group == b.group]
        if len(same) == 1:
            return same[0]
    key = _impl_key(b)
    for drop in ({key}, {key, PRECISION_KEY}):
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
    batch = b.params.get(BATCH_KEY)
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
    param_keys = [k for k in dict.fromkeys(k for b in benches for k in b.params) if k != IMPL_KEY]
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



def rows_table(rows: list[dict[str, Any]]) -> Table:
    """A script subject's plain rows, columns in first-seen order (nested values shown as JSON)."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    plain = [{k: v if isinstance(v, (int, float, str, bool, type(None))) else json.dumps(v, ensure_ascii=False)
              for k, v in r.items()} for r in rows]
    return Table([(c, c) for c in columns], plain)

