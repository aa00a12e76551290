"""Filtered search and near-duplicate groups at scale (issue 26), on one synthetic index, in one run.

`python -m benchmarks.bench_filters --rows 1000000 --out bench-out/filters.json`: the suite's clustered gallery
(bench_index.clustered_gallery) of `--rows` 512-d unit vectors stored in fp16 with the default IVF fast-scan
structure (plain CLIP scoring), one bulk add, payloads {"bucket": 0..99, "half": 0/1} drawn at random (not tied to
the clusters) plus planted near-duplicate groups. Q=1 searches, p50/p99 ms:
- ANN: unfiltered, filter matching 1% ({"bucket": 7}) and 50% ({"half": 1}); each filtered search's recall@10
  against the exact filtered top-10; the first filtered search's cost (the bitmap is built then cached).
- exact: the same three.
- duplicates at threshold 0.95 over every row, in a child process: seconds and its peak RSS, groups found against
  the planted ones.
Targets: 1% filter p50 <= 2x unfiltered ANN and recall@10 >= 0.98; 50% filter p50 <= 1.3x.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.index import AnnConfig, CompactionPolicy, Index, IndexManifest

from .bench_index import clustered_gallery, clustered_queries, machine

D = 512
FILTERS = {"1%": {"bucket": 7}, "50%": {"half": 1}}
TARGETS = {"1%": 2.0, "50%": 1.3}
PLANTED_GROUPS = 200  # groups of 2..4 near copies


def build(root: Path, n: int, scratch: Path, seed: int = 0) -> tuple[float, list[set[int]]]:
    """One bulk add of n rows (fp16, IVF) with payloads and planted duplicate groups; (seconds, planted groups)."""
    path = scratch / "g.npy"
    g = np.lib.format.open_memmap(path, "w+", np.float16, (n, D))
    start = 0
    for gg, _ in clustered_gallery(n, D, 1):
        g[start:start + len(gg)] = gg
        start += len(gg)
    rng = np.random.default_rng(seed)
    sources = rng.choice(n, PLANTED_GROUPS, replace=False)
    free = np.setdiff1d(np.arange(n), sources)
    copies = rng.choice(free, 3 * PLANTED_GROUPS, replace=False)
    planted, used = [], 0
    for source in sources:
        size = int(rng.integers(1, 4))
        members = copies[used:used + size]
        used += size
        for row in members:  # cosine about 0.995 to the source
            v = g[source].astype(np.float32) + 0.1 * rng.standard_normal(D).astype(np.float32) / np.sqrt(D)
            g[row] = v / np.linalg.norm(v)
        planted.append({int(source), *map(int, members)})
    g.flush()
    buckets, halves = rng.integers(0, 100, n), rng.integers(0, 2, n)
    payloads = [{"bucket": int(b), "half": int(h)} for b, h in zip(buckets, halves)]
    manifest = IndexManifest("synthetic", "bench", D, None, dtype="float16",
                             ann=AnnConfig(kind="ivf", min_rows=min(20_000, n), exact_below=min(50_000, n)))
    index = Index.create(root, manifest, policy=CompactionPolicy(max_small=1000))
    began = time.perf_counter()
    index.add_images(np.arange(n).tolist(), np.load(path, mmap_mode="r"), None, payloads)
    seconds = time.perf_counter() - began
    path.unlink()
    return seconds, planted


def search_figures(index: Index, queries: np.ndarray, exact_queries: int, k: int = 10) -> dict[str, Any]:
    """Q=1 searches, the unfiltered and the filtered ones taking turns query by query (so a busy machine's load
    falls on all of them alike): ANN over every query, exact over the first `exact_queries` (a full scan each)."""
    out: dict[str, Any] = {"first_filtered_search_ms": []}
    for where in FILTERS.values():  # the first filtered search builds the segment's bitmap: timed apart
        began = time.perf_counter()
        index.search_images(queries[:1], k, score=None, where=where)
        out["first_filtered_search_ms"].append((time.perf_counter() - began) * 1000)
    index.search_images(queries[:1], k, score=None)  # warm
    variants = {"unfiltered": None, **{f"filter_{name}": where for name, where in FILTERS.items()}}
    for mode, exact in (("ann", False), ("exact", True)):
        chosen = queries[:exact_queries] if exact else queries
        times: dict[str, list[float]] = {name: [] for name in variants}
        found: dict[str, list] = {name: [] for name in variants}
        for q in chosen:
            for name, where in variants.items():
                began = time.perf_counter()
                found[name].append(index.search_images(q[None], k, score=None, exact=exact, where=where)[0])
                times[name].append((time.perf_counter() - began) * 1000)
        base = np.percentile(times["unfiltered"], 50)
        for name, where in variants.items():
            entry = {"p50_ms": float(np.percentile(times[name], 50)), "p99_ms": float(np.percentile(times[name], 99)),
                     "ratio_p50": float(np.percentile(times[name], 50) / base)}
            if where is not None and not exact:
                truth = index.search_images(chosen, k, score=None, exact=True, where=where)  # one batched scan
                entry["recall@10"] = float(np.mean([overlap(t, f, k) for t, f in zip(truth, found[name])]))
                entry["target_ratio"] = TARGETS[name.split("_", 1)[1]]
            out[f"{mode}_{name}"] = entry
    return out


def overlap(truth: Any, got: Any, k: int) -> float:
    return len(set(zip(truth.positions, truth.rows)) & set(zip(got.positions, got.rows))) / min(k, len(truth.rows))


_CHILD = """
import json, sys, time
from pathlib import Path
from engine.duplicates import find_duplicates
from engine.index import Index

def status_mb(field):  # VmHWM / VmRSS of this process (ru_maxrss would include the forking parent's peak)
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
    return int(line.split()[1]) / 1024

snap = Index.open(sys.argv[1], refresh_interval_s=None).snapshot()
before = status_mb("VmRSS")
began = time.perf_counter()
found = find_duplicates(snap, 0.95)
seconds = time.perf_counter() - began
groups = [[int(snap.part_at("images", int(p)).id_at(int(r))) for p, r in found.where[g]] for g in found.groups]
print(json.dumps({"seconds": seconds, "peak_rss_mb": status_mb("VmHWM"), "rss_before_mb": before,
                  "groups": groups}))
"""


def duplicate_figures(root: Path, planted: list[set[int]]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(root)], capture_output=True, text=True, check=True)
    report = json.loads(done.stdout)
    found = [set(g) for g in report.pop("groups")]
    report["groups"] = len(found)
    report["planted_groups"] = len(planted)
    report["planted_found_exactly"] = sum(1 for p in planted if p in found)
    return report


def markdown(result: dict[str, Any]) -> str:
    s = result["search"]
    lines = [f"{result['rows']:,} rows, D = {D}, fp16, IVF fast-scan defaults, Q = 1 ({result['machine']['cpu']}, "
             f"{result['machine']['cores']} cores); bulk build {result['build_s']:.0f} s",
             "", "| search | p50 ms | p99 ms | x unfiltered (p50) | recall@10 vs exact filtered |", "|---|---|---|---|---|"]
    for mode in ("ann", "exact"):
        base = s[f"{mode}_unfiltered"]
        lines.append(f"| {mode}, no filter | {base['p50_ms']:.2f} | {base['p99_ms']:.2f} | 1 | |")
        for name in FILTERS:
            e = s[f"{mode}_filter_{name}"]
            recall = f"{e['recall@10']:.3f}" if "recall@10" in e else ""
            lines.append(f"| {mode}, filter {name} | {e['p50_ms']:.2f} | {e['p99_ms']:.2f} | {e['ratio_p50']:.3f} "
                         f"| {recall} |")
    first = ", ".join(f"{v:.0f} ms" for v in s["first_filtered_search_ms"])
    d = result["duplicates"]
    lines += ["", f"First search with each filter (evaluates the payloads once, then cached): {first}.",
              f"Duplicates at 0.95: {d['seconds']:.0f} s, peak RSS {d['peak_rss_mb']:.0f} MB "
              f"(after opening: {d['rss_before_mb']:.0f} MB), {d['groups']} groups, "
              f"{d['planted_found_exactly']} of {d['planted_groups']} planted groups found exactly."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--exact-queries", type=int, default=20, help="queries timed by exhaustive search")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--scratch", type=Path, help="where the index is built (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        root = Path(tmp) / "index"
        build_s, planted = build(root, args.rows, Path(tmp))
        index = Index.open(root, refresh_interval_s=None)
        result = {"rows": args.rows, "machine": machine(), "build_s": build_s,
                  "search": search_figures(index, clustered_queries(args.rows, args.queries, D),
                                            args.exact_queries)}
        del index
        result["duplicates"] = duplicate_figures(root, planted)
    print(markdown(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
