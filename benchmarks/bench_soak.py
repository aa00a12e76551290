"""Soak: 16 clients of mixed searches, adds and deletes against one server with a realistic index, for minutes.

An index of `--rows` synthetic images (clustered unit vectors with LACLIP crops, engine.Retriever
`add_image_embeddings`) and rows/10 texts is built first; `python -m engine.serve` opens it. Each client loops
over: text -> image search (45%), image -> text search with an uploaded image (20%), image -> image by id
(10%), text adds of 1..8 texts (15%), and deletes of texts it added earlier (10%). Reported: requests,
answers by status (target: no 5xx), p50/p99 per kind, the server's RSS after warm-up and at the end (target:
growth under 5%), and, after a graceful stop, whether every acknowledged add is on disk and every
acknowledged delete gone (target: zero lost writes).

    python -m benchmarks.bench_soak --out results/soak.json [--minutes 3] [--rows 100000] [--clients 16]
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks.bench_index import clustered_gallery, machine
from engine import Retriever
from engine.index import Index
from engine.laclip import LaclipConfig
from engine.serve.launcher import ServerProcess

REPO = Path(__file__).resolve().parents[1]
QUERIES = ["一只橘猫在窗台上晒太阳", "敦煌壁画中的飞天", "蓝色丝绸上的牡丹花纹", "山水之间的古寺", "床前明月光",
           "红色的灯笼挂在门口", "青花瓷盘上的鱼", "雪中的长城", "西湖边的柳树", "黄山云海与奇松"]
MIX = [("search_images", 45), ("search_texts", 20), ("similar", 10), ("add_texts", 15), ("delete_texts", 10)]
WARMUP_S = 45.0


def build_index(directory: Path, model: str, rows: int, dtype: str, seed: int = 0) -> tuple[int, int]:
    """A bound index of `rows` synthetic images (ids 0..rows-1) and rows // 10 texts (ids "t0".."t{n}")."""
    retriever = Retriever.from_checkpoint(None, model=model, laclip=LaclipConfig(), random_weights=True,
                                          progress=False, dtype=dtype)
    retriever.save(directory)
    d, k = retriever.encoder.embed_dim, retriever.laclip.num_crops
    start = 0
    for g, c in clustered_gallery(rows, d, k, seed, chunk=20_000):
        retriever.add_image_embeddings(list(range(start, start + len(g))), g, c)
        start += len(g)
    texts = rows // 10
    t = next(clustered_gallery(texts, d, 1, seed + 1, chunk=texts))[0]
    retriever.add_text_embeddings([f"t{i}" for i in range(texts)], t, [{"text": f"合成文字 {i}"} for i in range(texts)])
    return rows, texts


def query_images(n: int) -> list[bytes]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((320, 240), Image.BICUBIC).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Tally:
    """What the clients saw: statuses and latencies per kind, and the writes the server acknowledged."""

    statuses: Counter = field(default_factory=Counter)
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    added: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    transport_errors: Counter = field(default_factory=Counter)
    samples: dict[str, str] = field(default_factory=dict)  # the first answer of each non-200 (kind, status)


async def client_loop(worker: str, url: str, deadline: float, images: list[bytes], rows: int, tally: Tally) -> None:
    rng = random.Random(worker)
    kinds, weights = zip(*MIX)
    mine: list[str] = []
    serial = 0
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            if kind == "delete_texts" and not mine:
                kind = "add_texts"
            started = time.perf_counter()
            try:
                if kind == "search_images":
                    r = await client.post("/v1/search/images", json={"query": rng.choice(QUERIES), "k": 10})
                elif kind == "search_texts":
                    r = await client.post("/v1/search/texts", files={"image": ("q.jpg", rng.choice(images),
                                                                               "image/jpeg")}, data={"k": "10"})
                elif kind == "similar":
                    r = await client.post("/v1/search/similar", json={"id": rng.randrange(rows), "k": 10})
                elif kind == "add_texts":
                    ids = [f"soak-{worker}-{serial + i}" for i in range(rng.randint(1, 8))]
                    serial += len(ids)
                    r = await client.post("/v1/index/texts", json={"texts": [f"{rng.choice(QUERIES)} {i}"
                                                                             for i in ids], "ids": ids})
                    if r.status_code == 200:
                        mine.extend(ids)
                        tally.added.update(ids)
                else:
                    victims = [mine.pop(rng.randrange(len(mine))) for _ in range(min(len(mine), rng.randint(1, 3)))]
                    r = await client.post("/v1/index/texts/delete", json={"ids": victims})
                    if r.status_code == 200:
                        tally.deleted.update(victims)
                    else:
                        mine.extend(victims)
            except httpx.TransportError as exc:
                tally.transport_errors[type(exc).__name__] += 1
                continue
            tally.statuses[r.status_code] += 1
            tally.latency[kind].append(time.perf_counter() - started)
            if r.status_code != 200:
                tally.samples.setdefault(f"{kind} {r.status_code}", r.text[:300])


async def soak(phase: str, url: str, clients: int, seconds: float, images: list[bytes], rows: int,
               tally: Tally) -> None:
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(client_loop(f"{phase}{w}", url, deadline, images, rows, tally) for w in range(clients)))


def percentiles(values: list[float]) -> dict[str, float]:
    ms = np.array(values) * 1000
    return {"requests": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="write the report as JSON here")
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--rows", type=int, default=100_000, help="synthetic images in the index (texts: rows/10)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--model", default="tiny", help="tower structure (random weights; tiny keeps the towers from "
                                                    "dominating, so the soak exercises the server and the index)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="index storage precision")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    index_dir = work / "index"
    t0 = time.monotonic()
    rows, texts = build_index(index_dir, args.model, args.rows, args.dtype)
    build_s = time.monotonic() - t0
    print(f"built {rows} images + {texts} texts in {build_s:.0f} s", file=sys.stderr)
    server = ServerProcess(["--model", args.model, "--random-weights", "--index", str(index_dir),
                            "--max-concurrency", "256", "--request-timeout-s", "120"], work / "server.log",
                           cwd=REPO)
    tally = Tally()
    try:
        server.wait_ready(600)
        images = query_images(32)
        warm = min(WARMUP_S, args.minutes * 60 / 4)
        asyncio.run(soak("w", server.url, args.clients, warm, images, rows, tally))
        rss_start = rss_bytes(server.proc.pid)
        measured = Tally()
        t_soak = time.monotonic()
        asyncio.run(soak("m", server.url, args.clients, args.minutes * 60 - warm, images, rows, measured))
        soak_s = time.monotonic() - t_soak
        rss_end = rss_bytes(server.proc.pid)
        exit_code = server.stop()
    finally:
        server.stop()
    added = tally.added | measured.added
    deleted = tally.deleted | measured.deleted
    index = Index.open(index_dir)
    lost = sorted(i for i in added - deleted if not index.has_text(i))
    resurrected = sorted(i for i in deleted if index.has_text(i))
    statuses = tally.statuses + measured.statuses
    report = {
        "machine": machine(), "model": args.model, "dtype": args.dtype, "rows": rows, "texts": texts, "clients": args.clients,
        "minutes": args.minutes, "build_s": round(build_s, 1), "measured_s": round(soak_s, 1),
        "requests": sum(statuses.values()), "requests_measured": sum(measured.statuses.values()),
        "requests_per_s": round(sum(measured.statuses.values()) / soak_s, 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "server_errors_5xx": sum(v for k, v in statuses.items() if k >= 500),
        "transport_errors": dict(tally.transport_errors + measured.transport_errors),
        "error_samples": {**tally.samples, **measured.samples},
        "latency": {kind: percentiles(values) for kind, values in sorted(measured.latency.items())},
        "acknowledged_adds": len(added), "acknowledged_deletes": len(deleted),
        "lost_writes": len(lost), "resurrected_deletes": len(resurrected),
        "rss_after_warmup_mb": round(rss_start / 2**20, 1), "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_growth_pct": round(100 * (rss_end - rss_start) / rss_start, 2), "server_exit_code": exit_code,
    }
    shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    print(json.dumps(report, indent=1, ensure_ascii=False))
    return 0 if report["server_errors_5xx"] == 0 and not lost and not resurrected else 1


if __name__ == "__main__":
    raise SystemExit(main())
