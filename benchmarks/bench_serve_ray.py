"""Serving on Ray Serve against the single process: text->image queries/s and p50/p99 at 16 clients over loopback
HTTP, on one index of generated ViT-B-16-size vectors (random tower weights: the query encode costs what the real
model's does).

Rows: the single process; Ray Serve with 1 shard x 1 replica and 1 shard x 2 replicas (each on the same index);
and, on a second index of `--big-rows` rows, the single process against 2 shards x 1 replica. Each Ray row is
measured in rounds alternating with the single process (machine drift hits both alike; queries/s: median of the
rounds; latency percentiles: all rounds pooled), and reported as a ratio to it.

    python -m benchmarks.bench_serve_ray [--rows 100000] [--big-rows 1000000] [--out results/serve_ray.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from benchmarks.bench_index import clustered_gallery, clustered_queries
from benchmarks.bench_serve import REPO, Point, Round, closed_loop, summarise
from engine.index import AnnConfig, Index
from engine.index.search import ImageScorer
from engine.index.shards import ShardQuery, ShardView
from engine.retriever import Retriever
from engine.serve.launcher import ServerProcess

MODEL = "ViT-B-16"


def build_index(root: Path, rows: int, chunk: int = 100_000) -> float:
    """A plain-CLIP fp16 index of `rows` generated image vectors for the random-weight model (seconds taken)."""
    retriever = Retriever.from_checkpoint(None, model=MODEL, random_weights=True, laclip=None)
    retriever.attach(Index.create(root, replace(retriever.index.manifest, dtype="float16", ann=AnnConfig())))
    began = time.perf_counter()
    start = 0
    for g, _ in clustered_gallery(rows, retriever.encoder.embed_dim, 1, chunk=chunk):
        retriever.add_image_embeddings(list(range(start, start + len(g))), g)
        start += len(g)
    return time.perf_counter() - began


def shard_figures(index: Path, shards: int, queries: int = 200, k: int = 10) -> dict[str, float]:
    """What one shard costs, for planning: rows, bytes on disk per row, and its search p50 (Q = 1, in process)."""
    view = ShardView(index, 0, shards)
    snap = view._states[view.generation].snapshot
    rows = snap.live("images")
    size = sum(p.stat().st_size for live in snap.segments for p in index.glob(f"segments/{live.segment.name}*"))
    t = clustered_queries(rows * shards, queries, snap.manifest.embed_dim, seed=4)
    times = []
    for q in t:
        began = time.perf_counter()
        view.answer(ShardQuery(ImageScorer(q[None], None), k, False, snap.generation))
        times.append(time.perf_counter() - began)
    return {"shard_rows": rows, "bytes_per_row": size / rows, "search_p50_ms": 1000 * float(np.median(times)),
            "search_p99_ms": 1000 * float(np.percentile(times, 99))}


def server(index: Path, log: Path, extra: list[str]) -> ServerProcess:
    return ServerProcess(["--model", MODEL, "--random-weights", "--index", str(index), "--read-only",
                          "--max-queue", "4096", "--request-timeout-s", "600", *extra], log, cwd=REPO)


def compare(name: str, index: Path, extra: list[str], args: argparse.Namespace, work: Path) -> list[Point]:
    """Alternating rounds of the single process and the Ray Serve server `extra` on `index`."""
    single = server(index, work / f"{name}-single.log", [])
    ray = server(index, work / f"{name}.log", extra)
    try:
        single.wait_ready(1800)
        ray.wait_ready(1800)
        for s in (single, ray):
            asyncio.run(closed_loop(s.url, 4, 16, args.k))  # warm-up
        rounds: dict[str, list[Round]] = {"single process": [], name: []}
        for _ in range(args.rounds):
            for mode, s in (("single process", single), (name, ray)):
                seconds, latencies = asyncio.run(closed_loop(s.url, args.clients, args.requests, args.k))
                rounds[mode].append(Round(args.requests / seconds, seconds, latencies, 0.0, 0.0))
        points = [summarise(mode, args.clients, r) for mode, r in rounds.items()]
        for p in points:
            print(f"{p.mode:>28} {p.qps:7.1f} q/s  p50 {p.p50_ms:6.1f} ms  p99 {p.p99_ms:6.1f} ms", file=sys.stderr)
        return points
    finally:
        ray.stop()
        single.stop()


def table(pairs: list[tuple[int, list[Point]]]) -> str:
    rows = ["| index rows | server | queries/s (median) | p50 ms | p99 ms | p50 vs single process | q/s vs single |",
            "|---:|---|---:|---:|---:|---:|---:|"]
    for n, (single, other) in pairs:
        for p in (single, other):
            rows.append(f"| {n:,} | {p.mode} | {p.qps:.1f} | {p.p50_ms:.1f} | {p.p99_ms:.1f} | "
                        f"{p.p50_ms / single.p50_ms:.2f}x | {p.qps / single.qps:.2f}x |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000, help="rows of the index for the replica rows")
    ap.add_argument("--big-rows", type=int, default=1_000_000, help="rows of the index for the 2-shard row (0: skip)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=160, help="queries per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-ray-"))
    pairs: list[tuple[int, list[Point]]] = []
    per_shard: dict[str, float] = {}
    try:
        small = work / "small"
        print(f"building {args.rows:,} rows: {build_index(small, args.rows):.0f} s", file=sys.stderr)
        for name, extra in (("Ray Serve 1 shard x 1 replica", ["--ray", "--shards", "1", "--replicas", "1"]),
                            ("Ray Serve 1 shard x 2 replicas", ["--ray", "--shards", "1", "--replicas", "2"])):
            pairs.append((args.rows, compare(name, small, extra, args, work)))
        if args.big_rows:
            shutil.rmtree(small)
            big = work / "big"
            print(f"building {args.big_rows:,} rows: {build_index(big, args.big_rows):.0f} s", file=sys.stderr)
            pairs.append((args.big_rows, compare("Ray Serve 2 shards x 1 replica", big,
                                                 ["--ray", "--shards", "2", "--replicas", "1"], args, work)))
            per_shard = shard_figures(big, 2)
            print(f"one of 2 shards: {per_shard}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = table(pairs)
    print(f"model {MODEL} (random weights), {os.cpu_count()} CPUs, plain CLIP, fp16 rows, IVF candidates + exact "
          f"re-rank, k={args.k}, {args.clients} clients\n")
    print(report)
    if per_shard:
        print(f"\none shard of 2 at {args.big_rows:,} rows: {per_shard['shard_rows']:,} rows, "
              f"{per_shard['bytes_per_row']:.0f} bytes/row on disk, search p50 {per_shard['search_p50_ms']:.2f} ms, "
              f"p99 {per_shard['search_p99_ms']:.2f} ms (Q = 1, ANN + exact re-rank, in process)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "pairs": [[n, [asdict(p) for p in ps]] for n, ps in pairs],
                                        "per_shard": per_shard, "table": report}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
