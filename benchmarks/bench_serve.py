"""Serving benchmark: text->image queries/s and p50/p99 latency over loopback HTTP, dynamic batching vs max batch 1.

Two `python -m engine.serve` processes (same random ViT-B-16-size weights, same index) run side by side; for each
concurrency level the dynamic server and the max-batch-1 server are measured alternately for `--rounds` rounds,
so machine drift hits both alike (queries/s: median of the rounds; latency percentiles: all rounds pooled).
Closed loop: each client sends its next query as soon as the previous answer arrives.

    python -m benchmarks.bench_serve [--model ViT-B-16] [--concurrency 1 4 16 64] [--out results/serve.json]
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
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from engine.serve.launcher import ServerProcess

REPO = Path(__file__).resolve().parents[1]
QUERY_STEMS = ["一只橘猫在窗台上晒太阳", "敦煌壁画中的飞天", "蓝色丝绸上的牡丹花纹", "山水之间的古寺", "床前明月光",
               "红色的灯笼挂在门口", "青花瓷盘上的鱼", "雪中的长城", "西湖边的柳树", "黄山云海与奇松"]


@dataclass
class Point:
    """One (mode, concurrency) measurement."""

    mode: str
    clients: int
    requests: int
    seconds: float
    qps: float
    p50_ms: float
    p99_ms: float
    mean_batch: float


def make_gallery(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = int(rng.integers(160, 480)), int(rng.integers(160, 480))
        pixels = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((w, h), Image.BICUBIC).save(folder / f"{i}.png")


class BenchServer(ServerProcess):
    """A benchmark server with its tower thread count pinned, plus batch-size statistics from /metrics."""

    def __init__(self, args: list[str], log: Path, threads: int | None) -> None:
        super().__init__(args, log, env={"OMP_NUM_THREADS": str(threads)} if threads else None, cwd=REPO)

    def batch_stats(self) -> tuple[float, float]:
        """(sum, count) of the text tower's batch-size histogram."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        values = {}
        for line in text.splitlines():
            for key in ("sum", "count"):
                if line.startswith(f'cnclip_batch_size_{key}{{tower="text"}}'):
                    values[key] = float(line.split()[-1])
        return values.get("sum", 0.0), values.get("count", 0.0)


async def closed_loop(url: str, clients: int, total: int, k: int) -> tuple[float, list[float]]:
    """`clients` concurrent clients send `total` queries in all; (wall seconds, per-request latencies)."""
    latencies: list[float] = []
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker() -> None:
            for i in counter:
                query = f"{QUERY_STEMS[i % len(QUERY_STEMS)]}，第{i}号"
                started = time.perf_counter()
                r = await client.post("/v1/search/images", json={"query": query, "k": k})
                latencies.append(time.perf_counter() - started)
                if r.status_code != 200:
                    raise RuntimeError(f"query {i}: HTTP {r.status_code}: {r.text[:300]}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - t0, latencies


@dataclass
class Round:
    """One closed-loop run against one server."""

    qps: float
    seconds: float
    latencies: list[float]
    batched_items: float
    batches: float


def run_round(server: ServerProcess, clients: int, total: int, k: int) -> Round:
    before = server.batch_stats()
    seconds, latencies = asyncio.run(closed_loop(server.url, clients, total, k))
    after = server.batch_stats()
    return Round(total / seconds, seconds, latencies, after[0] - before[0], after[1] - before[1])


def summarise(mode: str, clients: int, rounds: list[Round]) -> Point:
    """Median queries/s over rounds; latency percentiles over all rounds' requests pooled."""
    ms = np.array([x for r in rounds for x in r.latencies]) * 1000
    batches = sum(r.batches for r in rounds)
    return Point(mode, clients, len(ms), sum(r.seconds for r in rounds), float(np.median([r.qps for r in rounds])),
                 float(np.percentile(ms, 50)), float(np.percentile(ms, 99)),
                 sum(r.batched_items for r in rounds) / batches if batches else 0.0)


def table(points: list[Point]) -> str:
    rows = ["| clients | mode | requests | queries/s (median) | p50 ms | p99 ms | p99/p50 | mean batch | speed-up vs batch 1 |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = {p.clients: p.qps for p in points if p.mode == "max-batch-1"}
    for p in points:
        rows.append(f"| {p.clients} | {p.mode} | {p.requests} | {p.qps:.2f} | {p.p50_ms:.0f} | {p.p99_ms:.0f} | "
                    f"{p.p99_ms / p.p50_ms:.2f} | {p.mean_batch:.1f} | {p.qps / base[p.clients]:.2f}x |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--requests", type=int, default=32, help="queries per round, at least 2 per client")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per mode and concurrency")
    ap.add_argument("--gallery-size", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-delay-ms", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each server (default: torch's)")
    ap.add_argument("--k", type=int, default=10, help="hits per query (at most the gallery size)")
    ap.add_argument("--out", type=Path, default=None, help="write the points and the table as JSON here")
    args = ap.parse_args(argv)
    args.k = min(args.k, args.gallery_size)

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    gallery, index = work / "gallery", work / "index"
    make_gallery(gallery, args.gallery_size)
    common = ["--model", args.model, "--random-weights", "--crops", "0", "--max-queue", "4096",
              "--request-timeout-s", "600", "--max-delay-ms", str(args.max_delay_ms)]
    t0 = time.monotonic()
    dynamic = BenchServer([*common, "--gallery", str(gallery), "--index", str(index),
                             "--max-batch-size", str(args.max_batch_size)], work / "dynamic.log", args.threads)
    servers: dict[str, ServerProcess] = {}
    try:
        dynamic.wait_ready(1800)
        print(f"indexed {args.gallery_size} images and loaded in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        servers[f"dynamic (max {args.max_batch_size})"] = dynamic
        servers["max-batch-1"] = BenchServer([*common, "--index", str(index), "--max-batch-size", "1"],
                                               work / "batch1.log", args.threads)
        servers["max-batch-1"].wait_ready(600)
        for server in servers.values():  # warm-up: first calls allocate
            asyncio.run(closed_loop(server.url, 2, 4, args.k))
        points = []
        for clients in args.concurrency:
            total = max(args.requests, 2 * clients)
            results: dict[str, list[Round]] = {mode: [] for mode in servers}
            for _ in range(args.rounds):  # alternate: one round of each mode in turn
                for mode, server in servers.items():
                    results[mode].append(run_round(server, clients, total, args.k))
            for mode, rounds in results.items():
                point = summarise(mode, clients, rounds)
                print(f"{mode:>18} clients={clients:<3} {point.qps:6.2f} q/s  p50 {point.p50_ms:7.0f} ms  "
                      f"p99 {point.p99_ms:7.0f} ms  mean batch {point.mean_batch:.1f}  rounds "
                      + " ".join(f"{r.qps:.2f}" for r in rounds), file=sys.stderr)
                points.append(point)
    finally:
        for server in [dynamic, *servers.values()]:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    for p in points:
        if p.mode.startswith("dynamic"):
            p.mode = "dynamic"
    report = table(points)
    print(f"model {args.model} (random weights), {os.cpu_count()} CPUs, gallery {args.gallery_size} images, "
          f"plain CLIP scoring, k={args.k}, max delay {args.max_delay_ms:g} ms\n")
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "points": [asdict(p) for p in points], "table": report}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
