"""Index at archive scale: durable write latency, open cost, compaction, exact vs ANN search, recall, fp16 agreement.

Synthetic gallery with realistic structure: N unit image vectors around N/100 cluster centres (within-cluster
cosine about 0.6), K crops near their image's global vector (cosine about 0.85), text queries near a random
centre; D=512, K=4, fp16 storage, IVF ANN. For each N: build (one bulk add), then add-1 / add-1000 / delete-1
durable latencies (median of repeats), open time and RSS growth after open (fresh process), compaction of the
small segments those adds left, and Q=1 search latency (p50/p99 over the queries) exact vs ANN+re-rank for plain
CLIP, image-weight and query-aware LACLIP with recall@10 of ANN against exact under the same settings (for the
queries near gallery clusters, and for a fifth as many around centres the gallery lacks).
fp16-vs-fp32 agreement (top-10 overlap of exact search) is measured on the smaller sizes.
The engine against the library it wraps (`--faiss N`, default 300k; `faiss_comparison`): plain CLIP, Q=1, k=10,
on one thread for both, the engine's ANN search (IVF fast-scan candidates, k x refine re-scored exactly from the
fp16 rows) against raw FAISS running the very IVF structure the engine stored in its segment, with the same
nprobe, wrapped in IndexRefineFlat (k_factor = refine, fp32 rows): p50/p99 latency, their ratio (target <= 1.5x)
and recall@10 against exact search for both.

    python -m benchmarks.bench_index --out results/index.json [--sizes 10000 100000 1000000] [--quick]
    python -m benchmarks.bench_index --out results/faiss.json --sizes --faiss 300000   # the comparison alone
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from benchmarks.params import scaled
from engine.index import AnnConfig, CompactionPolicy, Index, IndexManifest
from engine.laclip import LaclipConfig, ScoreConfig

REPO = Path(__file__).resolve().parents[1]
MODES = {"plain": ScoreConfig(alpha=1.0), "image-weight": ScoreConfig(0.1, 0.5, "image"),
         "query-aware": ScoreConfig(0.1, 0.5, "text")}
TARGETS = {"add1_ms_1M": 50.0, "add1_ratio_1M_vs_10k": 2.0, "open_s_1M": 1.0, "open_rss_mb_1M": 256.0,
           "speedup_1M": 20.0, "recall_plain": 0.98, "recall_image-weight": 0.98, "recall_query-aware": 0.95}
_CHUNK = 65536


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered_gallery(n: int, d: int, k: int, seed: int = 0, chunk: int = _CHUNK
                      ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(global [m, d], crops [m, k, d]) chunks of a clustered gallery of n images (unit vectors)."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((max(8, n // 100), d)))
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        g = _unit(centres[rng.integers(0, len(centres), m)] + 0.8 * rng.standard_normal((m, d)) / np.sqrt(d))
        c = _unit(g[:, None, :] + 0.6 * rng.standard_normal((m, k, d)) / np.sqrt(d))
        yield g, c


def clustered_queries(n_gallery: int, q: int, d: int, seed: int = 0) -> np.ndarray:
    """q text-like queries near random centres of the gallery made by `clustered_gallery(n_gallery, ...)`."""
    centres = _unit(np.random.default_rng(seed).standard_normal((max(8, n_gallery // 100), d)))
    rng = np.random.default_rng(seed + 1)
    return _unit(centres[rng.integers(0, len(centres), q)] + 0.9 * rng.standard_normal((q, d)) / np.sqrt(d))


def machine() -> dict[str, Any]:
    info = {"cpu": platform.processor(), "cores": os.cpu_count(), "isa": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags"))
        info["isa"] = [f for f in ("avx2", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]
        mem = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        info["ram_gb"] = round(int(mem.split()[1]) / 1e6, 1)
    except (OSError, StopIteration):
        pass
    return info


def build(root: Path, n: int, dtype: str, d: int, k: int, scratch: Path, nprobe: int | None = None) -> float:
    """One bulk add of the generated gallery (streamed through fp16/fp32 memory maps); returns seconds."""
    g_path, c_path = scratch / f"g-{dtype}.npy", scratch / f"c-{dtype}.npy"
    g = np.lib.format.open_memmap(g_path, "w+", dtype, (n, d))
    c = np.lib.format.open_memmap(c_path, "w+", dtype, (n, k, d))
    start = 0
    for gg, cc in clustered_gallery(n, d, k):
        g[start:start + len(gg)], c[start:start + len(gg)] = gg, cc
        start += len(gg)
    g.flush(), c.flush()
    manifest = IndexManifest("synthetic", "bench", d, LaclipConfig(num_crops=k), dtype=dtype,
                             ann=AnnConfig(kind="ivf", min_rows=min(20_000, n), exact_below=min(50_000, n),
                                           nprobe=nprobe))
    index = Index.create(root, manifest, policy=CompactionPolicy(max_small=1000))
    began = time.perf_counter()
    index.add_images(np.arange(n).tolist(), np.load(g_path, mmap_mode="r"), np.load(c_path, mmap_mode="r"))
    seconds = time.perf_counter() - began
    g_path.unlink(), c_path.unlink()
    return seconds


def timed(fn: Any, repeats: int) -> list[float]:
    out = []
    for i in range(repeats):
        began = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - began) * 1000)
    return out


def fsync_ms(folder: Path, repeats: int = 20) -> float:
    """Median latency of one small write + fsync here: a durable add costs four of them (segment, its folder,
    commit, index folder), so this is the floor the disk sets."""
    path = folder / "fsync-probe"
    with open(path, "wb") as f:
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())
            times.append((time.perf_counter() - began) * 1000)
    path.unlink()
    return float(np.median(times))


def open_cost(root: Path) -> dict[str, float]:
    """Open time and RSS growth in a fresh process (imports done before measuring)."""
    code = ("import json, time, resource\nfrom pathlib import Path\nfrom engine.index import Index\n"
            "def rss():\n    return int(next(l for l in Path('/proc/self/status').read_text().splitlines()"
            " if l.startswith('VmRSS')).split()[1]) / 1024\n"
            f"before = rss(); t = time.perf_counter(); index = Index.open({str(root)!r})\n"
            "s = time.perf_counter() - t; after = rss()\n"
            "print(json.dumps({'open_s': s, 'rss_mb': after - before, 'images': index.snapshot().live('images')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def search_figures(index: Index, queries: np.ndarray, elsewhere: np.ndarray, k: int = 10
                   ) -> dict[str, dict[str, float]]:
    """Q=1 latency exact vs ANN+re-rank per mode, recall@10 of ANN against exact for the queries near gallery
    clusters (the target's) and for `elsewhere`, queries around centres the gallery does not have (harder)."""
    out = {}
    for mode, score in MODES.items():
        index.search_images(queries[:1], k, score=score, exact=True)  # warm: pooled vectors, page cache
        index.search_images(queries[:1], k, score=score)
        exact, truths = _timed_searches(index, queries, k, score, exact=True)
        approx, found = _timed_searches(index, queries, k, score, exact=False)
        recall = [_overlap(t, f, k) for t, f in zip(truths, found)]
        far = [_overlap(t, a, k) for t, a in zip(index.search_images(elsewhere, k, score=score, exact=True),
                                                 index.search_images(elsewhere, k, score=score))]
        out[mode] = {"exact_p50_ms": float(np.percentile(exact, 50)), "exact_p99_ms": float(np.percentile(exact, 99)),
                     "ann_p50_ms": float(np.percentile(approx, 50)), "ann_p99_ms": float(np.percentile(approx, 99)),
                     "speedup_p50": float(np.percentile(exact, 50) / np.percentile(approx, 50)),
                     "recall@10": float(np.mean(recall)), "recall@10_elsewhere": float(np.mean(far))}
    return out


def _timed_searches(index: Index, queries: np.ndarray, k: int, score: ScoreConfig, *, exact: bool
                    ) -> tuple[list[float], list[Any]]:
    """Q=1 searches one after another (ms each, results): one kind at a time, as a server answering them would,
    so an exact scan's sweep of the memory map does not evict what the next ANN query reads."""
    times, results = [], []
    for q in queries:
        began = time.perf_counter()
        results.append(index.search_images(q[None], k, score=score, exact=exact)[0])
        times.append((time.perf_counter() - began) * 1000)
    return times, results


def _overlap(truth: Any, got: Any, k: int) -> float:
    return len(set(zip(truth.positions, truth.rows)) & set(zip(got.positions, got.rows))) / k


def fp16_agreement(root16: Path, root32: Path, queries: np.ndarray, k: int = 10) -> dict[str, float]:
    """Mean top-k overlap of exact search, fp16 storage against fp32 storage, per mode."""
    def top_ids(index: Index, score: ScoreConfig) -> list[set]:
        snap = index.snapshot()
        return [{snap.part_at("images", int(p)).id_at(int(r)) for p, r in zip(f.positions, f.rows)}
                for f in index.search_images(queries, k, score=score, exact=True, snapshot=snap)]

    a, b = Index.open(root16), Index.open(root32)
    return {mode: float(np.mean([len(x & y) / k for x, y in zip(top_ids(a, score), top_ids(b, score))]))
            for mode, score in MODES.items()}


def run_size(n: int, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    d, k = args.dim, args.crops
    root = scratch / f"idx-{n}"
    result: dict[str, Any] = {"N": n, "build_s": build(root, n, "float16", d, k, scratch),
                              "fsync_ms": fsync_ms(scratch)}
    print(f"N={n}: built in {result['build_s']:.1f} s", flush=True)
    index = Index.open(root, policy=CompactionPolicy(max_small=1000))
    rng = np.random.default_rng(7)
    batches = {rows: [(_unit(rng.standard_normal((rows, d))), _unit(rng.standard_normal((rows, k, d))))
                      for _ in range(args.repeats)] for rows in (1, 1000)}  # made before the clock starts

    def add(i: int, rows: int) -> None:
        g, c = batches[rows][i]
        index.add_images([f"add{rows}-{i}-{j}" for j in range(rows)], g, c)

    add1 = timed(lambda i: add(i, 1), args.repeats)
    add1000 = timed(lambda i: add(i, 1000), max(2, args.repeats // 4))
    delete1 = timed(lambda i: index.delete_images([i * 7]), args.repeats)
    result.update(add1_p50_ms=float(np.median(add1)), add1_max_ms=float(np.max(add1)),
                  add1000_p50_ms=float(np.median(add1000)), delete1_p50_ms=float(np.median(delete1)))
    began = time.perf_counter()
    index.policy = CompactionPolicy(max_small=1)  # now merge the small segments those writes left
    index.compact(full=False)
    result["compact_small_s"] = time.perf_counter() - began
    result.update(open_cost(root))
    queries = clustered_queries(n, args.queries, d)
    elsewhere = clustered_queries(n, max(5, args.queries // 5), d, seed=100)
    result["search"] = search_figures(Index.open(root), queries, elsewhere)
    if n <= args.fp32_max:
        root32 = scratch / f"idx32-{n}"
        build(root32, n, "float32", d, k, scratch)
        result["fp16_vs_fp32_top10"] = fp16_agreement(root, root32, queries)
        shutil.rmtree(root32)
    if n <= args.full_compact_max:
        began = time.perf_counter()
        index.compact()
        result["compact_full_s"] = time.perf_counter() - began
    shutil.rmtree(root)
    return result


def faiss_comparison(n: int, d: int, queries: int, scratch: Path, k: int = 10,
                     nprobes: tuple[int | None, ...] = (None,)) -> list[dict[str, Any]]:
    """The engine's Q=1 ANN search against raw FAISS on the same IVF structure, vectors and settings (module
    docstring), once per nprobe (None: the engine's default); both on one thread (torch and FAISS)."""
    import faiss

    root = scratch / f"faiss-{n}"
    build(root, n, "float16", d, 1, scratch)
    vectors = np.concatenate([g for g, _ in clustered_gallery(n, d, 1)])  # the same generator: the same rows
    qs = clustered_queries(n, queries, d)
    truth = [set(np.argsort(-(vectors @ q))[:k].tolist()) for q in qs]
    try:
        return [_versus_faiss(root, vectors, qs, truth, k, nprobe) for nprobe in nprobes]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _versus_faiss(root: Path, vectors: np.ndarray, qs: np.ndarray, truth: list[set], k: int,
                  nprobe: int | None) -> dict[str, Any]:
    import dataclasses

    import faiss
    import torch

    n = len(vectors)
    index = Index.open(root)
    snap = index.snapshot()
    if nprobe is not None:  # search settings live in the commit's manifest: a snapshot with other ones
        manifest = dataclasses.replace(snap.manifest, ann=dataclasses.replace(snap.manifest.ann, nprobe=nprobe))
        snap = dataclasses.replace(snap, manifest=manifest)
    segments = [live.segment.parts["images"] for live in snap.segments]
    assert len(segments) == 1 and segments[0].ann is not None, "one segment with an IVF structure expected"
    ann = snap.manifest.ann
    raw = faiss.deserialize_index(np.ascontiguousarray(segments[0].ann._data))
    raw.implem = 12  # FAISS's own choice for a single-threaded fast-scan search
    nprobe = ann.probes_for(raw.nlist)
    rows32 = np.ascontiguousarray(vectors, np.float32)
    refined = faiss.IndexRefineFlat(raw, faiss.swig_ptr(rows32))
    params = faiss.IndexRefineSearchParameters(k_factor=ann.refine,
                                               base_index_params=faiss.SearchParametersIVF(nprobe=nprobe))
    threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        index.search_images(qs[:1], k, score=None, snapshot=snap)  # warm: the IVF deserialised, the pages read
        engine_ms, engine_found = [], []
        for q in qs:
            began = time.perf_counter()
            found = index.search_images(q[None], k, score=None, snapshot=snap)[0]
            engine_ms.append((time.perf_counter() - began) * 1000)
            engine_found.append(set(int(i) for i in found.rows))
        refined.search(qs[:1], k, params=params)
        faiss_ms, faiss_found = [], []
        for q in qs:
            began = time.perf_counter()
            _, labels = refined.search(q[None], k, params=params)
            faiss_ms.append((time.perf_counter() - began) * 1000)
            faiss_found.append(set(labels[0].tolist()))
    finally:
        torch.set_num_threads(threads[0])
        faiss.omp_set_num_threads(threads[1])
    out = {"N": n, "queries": len(qs), "nlist": int(raw.nlist), "nprobe": nprobe, "refine": ann.refine,
           "threads": 1, "engine_p50_ms": float(np.percentile(engine_ms, 50)),
           "engine_p99_ms": float(np.percentile(engine_ms, 99)), "faiss_p50_ms": float(np.percentile(faiss_ms, 50)),
           "faiss_p99_ms": float(np.percentile(faiss_ms, 99)),
           "engine_recall@10": float(np.mean([len(t & f) / k for t, f in zip(truth, engine_found)])),
           "faiss_recall@10": float(np.mean([len(t & f) / k for t, f in zip(truth, faiss_found)]))}
    out["engine_over_faiss_p50"] = out["engine_p50_ms"] / out["faiss_p50_ms"]
    return out


def faiss_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| N | threads | nlist / nprobe / refine | engine p50 / p99 ms | raw FAISS p50 / p99 ms | engine / FAISS (p50) "
             "| recall@10 engine / FAISS |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['N']:,} | {r['threads']} | {r['nlist']} / {r['nprobe']} / {r['refine']} | "
                     f"{r['engine_p50_ms']:.3f} / {r['engine_p99_ms']:.3f} | {r['faiss_p50_ms']:.3f} / "
                     f"{r['faiss_p99_ms']:.3f} | {r['engine_over_faiss_p50']:.2f}x | "
                     f"{r['engine_recall@10']:.3f} / {r['faiss_recall@10']:.3f} |")
    return "\n".join(lines)


def rows_of(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        base = {"N": r["N"]}
        for name in ("build_s", "fsync_ms", "add1_p50_ms", "add1_max_ms", "add1000_p50_ms", "delete1_p50_ms", "open_s", "rss_mb",
                     "compact_small_s", "compact_full_s"):
            if name in r:
                rows.append({**base, "metric": name, "value": round(r[name], 4)})
        for mode, figures in r["search"].items():
            rows.append({**base, "metric": f"search {mode}", **{k: round(v, 3) for k, v in figures.items()},
                         "fp16_vs_fp32_top10": r.get("fp16_vs_fp32_top10", {}).get(mode)})
    return rows


def markdown(results: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores, {info.get('ram_gb')} GB RAM, ISA {' '.join(info['isa'])}",
             "", "| N | build s | fsync ms | add-1 p50 ms (max) | add-1000 p50 ms | delete-1 p50 ms | open s | RSS after open MB "
             "| compact small s | compact full s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        full = f"{r['compact_full_s']:.1f}" if "compact_full_s" in r else "-"
        lines.append(f"| {r['N']:,} | {r['build_s']:.1f} | {r.get('fsync_ms', float('nan')):.1f} | {r['add1_p50_ms']:.1f} ({r['add1_max_ms']:.0f}) | "
                     f"{r['add1000_p50_ms']:.1f} | {r['delete1_p50_ms']:.1f} | {r['open_s']:.3f} | {r['rss_mb']:.1f} | "
                     f"{r['compact_small_s']:.2f} | {full} |")
    lines += ["", "| N | scoring | exact p50 / p99 ms | ANN+re-rank p50 / p99 ms | speed-up (p50) | recall@10 "
              "| recall@10, queries elsewhere | fp16 vs fp32 top-10 |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for mode, f in r["search"].items():
            agree = r.get("fp16_vs_fp32_top10", {}).get(mode)
            lines.append(f"| {r['N']:,} | {mode} | {f['exact_p50_ms']:.1f} / {f['exact_p99_ms']:.1f} | "
                         f"{f['ann_p50_ms']:.2f} / {f['ann_p99_ms']:.2f} | {f['speedup_p50']:.1f}x | "
                         f"{f['recall@10']:.3f} | {f['recall@10_elsewhere']:.3f} | "
                         f"{'-' if agree is None else f'{agree:.3f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    p.add_argument("--quick", action="store_true", help="N = 10k and 30k, fewer queries and repeats")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--crops", type=int, default=4)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--fp32-max", type=int, default=100_000, help="largest N with the fp16-vs-fp32 comparison")
    p.add_argument("--full-compact-max", type=int, default=100_000, help="largest N with a timed full compaction")
    p.add_argument("--scratch", type=Path, help="where to build the indexes (default: a temporary folder)")
    p.add_argument("--faiss", type=int, default=300_000, metavar="N",
                   help="rows of the engine-vs-raw-FAISS comparison (0: skip it)")
    p.add_argument("--faiss-nprobe", type=int, nargs="*", default=[32],
                   help="IVF probes compared besides the engine's default (an eighth of the lists)")
    args = p.parse_args(argv)
    if args.quick:  # shrunk further by the runner's scale when the suite's budget is tight
        args.sizes = [scaled(10_000, 2_000), scaled(30_000, 5_000)]
        args.queries, args.repeats, args.faiss = scaled(30, 10), scaled(8, 3), scaled(min(args.faiss, 50_000), 20_000)
    if args.scratch is not None:
        args.scratch.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-index-", dir=args.scratch))
    info = machine()
    results = []
    try:
        for n in args.sizes:
            results.append(run_size(n, args, scratch))
            print(markdown(results[-1:], info), flush=True)
        versus = (faiss_comparison(args.faiss, args.dim, max(args.queries, 200), scratch,
                                   nprobes=(None, *args.faiss_nprobe)) if args.faiss else [])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = rows_of(results)
    for row in versus:
        rows.append({"N": row["N"], "metric": "engine vs raw FAISS (Q=1, 1 thread)",
                     **{k: round(v, 4) for k, v in row.items() if k != "N"}})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "results": results, "faiss": versus,
                                    "targets": {**TARGETS, "engine_over_faiss_p50": 1.5}, "rows": rows}, indent=2))
    print(markdown(results, info) if results else "")
    if versus:
        print(faiss_markdown(versus))
    return 0


if __name__ == "__main__":
    sys.exit(main())
