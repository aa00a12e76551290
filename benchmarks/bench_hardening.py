"""Issue 24's figures against a real `python -m engine.serve --model tiny --in-memory` (defaults otherwise):

- the progressive-JPEG bomb (a flat 4000x4000 grey image whose last scan is repeated 2,000 times): seconds to its
  400, two sent at once, and the p50 of text searches made meanwhile as a ratio to their idle p50 (target <= 3x);
- one add of 32 1-bit PNGs of 7999x7999: growth of the server's peak memory (VmHWM; target <= 400 MB), with the
  decoding processes' own peaks beside it.

    python -m benchmarks.bench_hardening [--images 32] [--out results/hardening.json]
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

from benchmarks.report_collect import machine_info
from engine.serve.launcher import ServerProcess


def progressive_bomb(side: int = 4000, repeats: int = 2000) -> bytes:
    """A flat grey progressive JPEG whose last scan is repeated `repeats` times (tiny; each scan redoes the image)."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, "JPEG", progressive=True, quality=75)
    data = buffer.getvalue()
    last_scan = data[data.rfind(b"\xff\xda"):-2]
    return data[:-2] + last_scan * repeats + b"\xff\xd9"


def png(mode: str, side: int, value: int = 1) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (side, side), value).save(buffer, "PNG")
    return buffer.getvalue()


def vm(pid: int, key: str) -> float:
    """A /proc/PID/status figure in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def children(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").iterdir():
            kids = (task / "children").read_text().split()
            found += [int(k) for k in kids]
            todo += [int(k) for k in kids]
    return found


def search_seconds(url: str) -> float:
    started = time.perf_counter()
    r = httpx.post(f"{url}/v1/search/images", json={"query": "敦煌壁画中的飞天", "k": 3}, timeout=120)
    r.raise_for_status()
    return time.perf_counter() - started


def bombs(url: str, searches: int = 9) -> dict:
    idle = [search_seconds(url) for _ in range(searches)]
    bomb, answers = progressive_bomb(), []

    def send() -> None:
        started = time.perf_counter()
        r = httpx.post(f"{url}/v1/search/texts", files={"image": ("bomb.jpg", bomb, "image/jpeg")}, timeout=120)
        answers.append({"status": r.status_code, "seconds": time.perf_counter() - started})

    threads = [threading.Thread(target=send) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    during = []
    while any(t.is_alive() for t in threads) or not during:
        during.append(search_seconds(url))
    for t in threads:
        t.join()
    idle_p50, during_p50 = statistics.median(idle), statistics.median(during)
    return {"bomb_bytes": len(bomb), "answers": answers, "search_idle_p50_ms": idle_p50 * 1e3,
            "search_during_p50_ms": during_p50 * 1e3, "searches_during": len(during),
            "ratio": during_p50 / idle_p50}


def memory(server: ServerProcess, images: int) -> dict:
    huge = png("1", 7999)
    pid = server.proc.pid
    before = vm(pid, "VmHWM")
    kids_before = {k: vm(k, "VmHWM") for k in children(pid)}
    started = time.perf_counter()
    r = httpx.post(f"{server.url}/v1/index/images", timeout=1800,
                   files=[("images", (f"huge{i}.png", huge, "image/png")) for i in range(images)])
    r.raise_for_status()
    kids = {k: vm(k, "VmHWM") for k in children(pid)}
    return {"images": images, "png_bytes": len(huge), "seconds": time.perf_counter() - started,
            "server_vmhwm_before_mb": before, "server_vmhwm_growth_mb": vm(pid, "VmHWM") - before,
            "server_rss_after_mb": vm(pid, "VmRSS"),
            "child_vmhwm_growth_mb": {str(k): v - kids_before.get(k, 0.0) for k, v in kids.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(["--model", "tiny", "--in-memory", "--max-request-pixels", "3000000000"],
                               Path(tmp) / "server.log")
        with server.serving() as srv:
            small = [("images", (f"s{i}.png", png("RGB", 48 + i, i), "image/png")) for i in range(4)]
            httpx.post(f"{srv.url}/v1/index/images", files=small, timeout=120).raise_for_status()
            machine = {k: v for k, v in machine_info().items() if k != "cpu_flags"}
            result = {"machine": machine, "bombs": bombs(srv.url), "memory": memory(srv, args.images)}
    print(json.dumps(result, indent=2, ensure_ascii=False))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
