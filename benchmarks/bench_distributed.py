"""Indexing throughput: single process vs Ray Data with 1 and 2 local encode workers (engine.distributed).

For each model (random weights) the same generated collection is indexed into a fresh index by each mode, in
alternating rounds so machine drift hits every mode alike. Reported per mode (median of the rounds):
- job images/s: images / wall time of `index_collection` (the local Ray is started once, before timing, but
  each Ray job pays its actors' model loading and Ray Data's start-up, so small collections favour one process);
- the ratio to the single process measured in the same run. Ray's overhead at 1 worker is 1 - that ratio.
(Ray Data hands finished segments to the driver in bursts, so progress timestamps cannot give a steady rate.)
Ray runs with `num_cpus` = this machine's cores: 1 worker gets 1 logical CPU and all cores as torch threads
(as the single process), 2 workers get half a CPU and cores/2 threads each; prepare/write tasks get the rest.

    python -m benchmarks.bench_distributed [--out results/distributed.json] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.distributed import IndexJob, RayOptions, index_collection
from engine.laclip import LaclipConfig


@dataclass
class Point:
    """One (model, mode) measurement: medians over the rounds."""

    model: str
    mode: str
    images: int
    job_seconds: float
    job_images_per_s: float
    ratio: float = 1.0


def cpu_name() -> str:
    """The CPU model name and the ISA extensions that matter for the towers."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({os.cpu_count()} CPUs; {' '.join(isa) or 'no AVX2'})"


def make_collection(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = int(rng.integers(200, 640)), int(rng.integers(200, 640))
        pixels = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((w, h), Image.BICUBIC).save(folder / f"{i}.jpg", quality=90)


def run_once(job: IndexJob, out: Path) -> float:
    """Wall seconds of one job into a fresh index."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    report = index_collection(replace(job, out=str(out)))
    seconds = time.perf_counter() - start
    if report.images_added != job_images(job):
        raise RuntimeError(f"{report.images_added} images indexed, expected {job_images(job)}")
    return seconds


def job_images(job: IndexJob) -> int:
    return sum(1 for _ in Path(job.images[0]).glob("*.jpg"))


def table(points: list[Point]) -> str:
    rows = ["| model | mode | images | job s | images/s | vs single process |", "|---|---|---:|---:|---:|---:|"]
    for p in points:
        rows.append(f"| {p.model} | {p.mode} | {p.images} | {p.job_seconds:.1f} | {p.job_images_per_s:.2f} | "
                    f"{p.ratio:.2f}x |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "ViT-B-16"])
    ap.add_argument("--images", type=int, nargs="+", default=None,
                    help="images per model (default 2000 tiny, 96 ViT-B-16)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4, help="images per encode batch and per segment")
    ap.add_argument("--crops", type=int, default=4, help="LACLIP crops per image (0: plain CLIP)")
    ap.add_argument("--quick", action="store_true", help="few images, one round (a smoke run)")
    ap.add_argument("--out", type=Path, default=None, help="write the points and the table as JSON here")
    args = ap.parse_args(argv)
    sizes = args.images or ([16, 8] if args.quick else [2000, 96])
    rounds = 1 if args.quick else args.rounds
    cores = os.cpu_count() or 1

    import ray

    ray.init(num_cpus=cores, object_store_memory=1024 ** 3, include_dashboard=False, log_to_driver=False)
    modes = {"single process": None,
             "ray, 1 worker": RayOptions(workers=1, cpus_per_worker=1, cpus_per_task=max(cores - 1, 1) / 2,
                                         threads_per_worker=cores),
             "ray, 2 workers": RayOptions(workers=2, cpus_per_worker=cores / 4, cpus_per_task=cores / 4,
                                          threads_per_worker=max(cores // 2, 1))}
    work = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    points: list[Point] = []
    try:
        for model, n in zip(args.models, sizes):
            folder = work / f"images-{model}"
            make_collection(folder, n)
            laclip = LaclipConfig(num_crops=args.crops) if args.crops else None
            base = IndexJob([str(folder)], "", model=model, random_weights=True, laclip=laclip,
                            batch_size=args.batch_size, segment_rows=args.batch_size, progress=False)
            measured: dict[str, list[float]] = {mode: [] for mode in modes}
            for _ in range(rounds):
                for mode, options in modes.items():
                    seconds = run_once(replace(base, ray=options), work / "index")
                    measured[mode].append(seconds)
                    print(f"{model:>9} {mode:>15}: {seconds:6.1f} s, {n / seconds:6.2f} images/s", file=sys.stderr)
            for mode, results in measured.items():
                seconds = statistics.median(results)
                points.append(Point(model, mode, n, seconds, n / seconds))
            single = points[-len(modes)]
            for p in points[-len(modes):]:
                p.ratio = p.job_images_per_s / single.job_images_per_s
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    report = table(points)
    machine = cpu_name()
    print(f"{machine}; torch {torch.__version__}, {torch.get_num_threads()} threads; LACLIP K={args.crops}, "
          f"batch {args.batch_size}, {rounds} round(s), random weights\n")
    print(report)
    overhead = {p.model: 1 - p.ratio for p in points if p.mode == "ray, 1 worker"}
    print("\nRay overhead at 1 worker (job images/s, start-up included; target <= 15%): "
          + ", ".join(f"{m} {o:.0%}" for m, o in overhead.items()))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                        "points": [asdict(p) for p in points], "ray_overhead_1_worker": overhead,
                                        "table": report}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
