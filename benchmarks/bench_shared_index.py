"""Two processes writing one index: a server taking adds and deletes from clients while `python -m engine index`
adds image folders to the same directory (issue 23's figure). Targets: no 5xx, no acknowledged write lost (every
acknowledged add present, every acknowledged delete gone, every image the CLI indexed present), `verify()` passes.

    python -m benchmarks.bench_shared_index [--seconds 60] [--clients 4] [--cli-images 150] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from engine.index import Index
from engine.serve.launcher import ServerProcess

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["一只橘猫在窗台上晒太阳", "敦煌壁画中的飞天", "蓝色丝绸上的牡丹花纹", "山水之间的古寺", "床前明月光"]
MODEL = ["--model", "tiny", "--random-weights"]


def image_folder(root: Path, count: int, seed: int) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(root / f"s{seed}-{i}.png")
    return root


def cli_index(out: Path, images: Path, log: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", "index", *MODEL, "--out", str(out), "--images", str(images),
                           "--quiet"], cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def client(url: str, name: str, stop: threading.Event, acked_adds: set, acked_deletes: set, statuses: Counter,
           lock: threading.Lock) -> None:
    rng = random.Random(name)
    mine: list[str] = []
    n = 0
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop.is_set():
            roll = rng.random()
            if roll < 0.5 or not mine:
                ids = [f"{name}-{n + j}" for j in range(rng.randint(1, 4))]
                n += len(ids)
                r = http.post("/v1/index/texts", json={"texts": [rng.choice(TEXTS) for _ in ids], "ids": ids})
                if r.status_code == 200:
                    with lock:
                        acked_adds.update(ids)
                    mine.extend(ids)
            elif roll < 0.75:
                victim = mine.pop(rng.randrange(len(mine)))
                r = http.delete(f"/v1/index/texts/{victim}")
                if r.status_code == 200:
                    with lock:
                        acked_deletes.add(victim)
            else:
                r = http.post("/v1/search/images", json={"query": rng.choice(TEXTS), "k": 5})
            with lock:
                statuses[r.status_code] += 1


def run(seconds: float, clients: int, cli_images: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="shared-index-"))
    out = work / "idx"
    first = cli_index(out, image_folder(work / "a", 20, seed=1), work / "cli-0.log")
    if first.returncode != 0:
        raise SystemExit(f"the first indexing run failed: {(work / 'cli-0.log').read_text()[-2000:]}")
    srv = ServerProcess([*MODEL, "--index", str(out)], work / "server.log", env={"OMP_NUM_THREADS": "1"}, cwd=REPO)
    acked_adds: set[str] = set()
    acked_deletes: set[str] = set()
    statuses: Counter = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    folders = [image_folder(work / f"b{i}", cli_images, seed=10 + i) for i in range(2)]
    cli_codes = []
    try:
        srv.wait_ready()
        threads = [threading.Thread(target=client, args=(srv.url, f"c{i}", stop, acked_adds, acked_deletes, statuses,
                                                         lock)) for i in range(clients)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for i, folder in enumerate(folders):  # two CLI runs while the clients write
            cli_codes.append(cli_index(out, folder, work / f"cli-{i + 1}.log").returncode)
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        srv.stop(signal.SIGTERM)
    index = Index.open(out)
    index.verify()
    texts = set(map(str, index.text_ids))
    images = set(map(str, index.image_ids))
    cli_ids = {p.stem for folder in folders for p in folder.iterdir()}
    lost_adds = sorted((acked_adds - acked_deletes) - texts)
    undone_deletes = sorted(acked_deletes & texts)
    return {
        "seconds": round(elapsed, 1), "clients": clients, "requests": sum(statuses.values()),
        "statuses": dict(sorted(statuses.items())), "server_errors_5xx": sum(v for k, v in statuses.items() if k >= 500),
        "acknowledged_adds": len(acked_adds), "acknowledged_deletes": len(acked_deletes), "lost_adds": lost_adds,
        "undone_deletes": undone_deletes, "cli_runs": cli_codes, "cli_images": len(cli_ids),
        "cli_images_missing": sorted(cli_ids - images), "verified": True, "work": str(work),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--cli-images", type=int, default=150)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    result = run(args.seconds, args.clients, args.cli_images)
    text = json.dumps(result, indent=1, ensure_ascii=False)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    ok = (result["server_errors_5xx"] == 0 and not result["lost_adds"] and not result["undone_deletes"]
          and not result["cli_images_missing"] and all(code == 0 for code in result["cli_runs"]))
    print("shared index:", "OK" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
