"""Fine-tuning throughput: training pairs/s of one optimizer step, plain back-propagation vs gradient caching.

For each model (tiny and ViT-B-16, random weights) and batch size, one process times the whole step the trainer
runs (`engine.finetune.gradcache.step_gradients`, gradient clipping, AdamW) on prepared pixels and token ids:
stage 2 (both towers train) plain and with gradient caching (chunks of a quarter batch), and stage 1 (text only)
plain. Pairs/s is the batch over the median step time; gradient caching is reported as a ratio to plain in the
same run, with each mode's extra peak resident memory. The image pipeline (decode + cn_clip's transform, one
core) is measured separately, since it runs in loader workers beside the step. On a CUDA GPU the same steps run
for ViT-B-16 in bf16 autocast (the trainer's GPU precision); without one that row is skipped and says why.

    python -m benchmarks.bench_finetune --out results/finetune.json [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.machine import PeakMemory
from engine.backends.cpu_features import cpu_info
from engine.finetune.config import FinetuneConfig
from engine.finetune.gradcache import StepInputs, step_gradients
from engine.finetune.schedule import build_optimizer
from engine.finetune.train import set_stage
from engine.models import build_random_model, get_spec
from engine.preprocess import ImageTransform, load_image


@dataclass
class Point:
    """One (model, mode, batch) measurement."""

    model: str
    mode: str
    batch: int
    chunk: int | None
    steps: int
    seconds_per_step: float
    pairs_per_s: float
    peak_extra_mib: float | None
    ratio_to_plain: float | None = None


def make_inputs(batch: int, resolution: int, text_length: int, seed: int = 0) -> StepInputs:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(672, 7000, (batch, text_length), generator=gen)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return StepInputs(torch.randn(batch, 3, resolution, resolution, generator=gen), ids,
                      torch.eye(batch, dtype=torch.bool))


def time_steps(model_name: str, mode: str, batch: int, steps: int, text_length: int, device: str = "cpu") -> Point:
    """Warm-up step, then `steps` timed optimizer steps of `mode` (stage2, stage2-gradcache, stage1); on CUDA in
    bf16 autocast, synchronising inside each timed step."""
    spec = get_spec(model_name)
    model = build_random_model(spec).to(device)
    stage = 1 if mode == "stage1" else 2
    chunk = max(1, batch // 4) if mode.endswith("gradcache") else None
    set_stage(model, stage)
    config = FinetuneConfig(model=model_name, data=Path("."), out=Path("."), batch_size=batch, grad_clip=1.0)
    optimizer = build_optimizer(model, config)
    inputs = make_inputs(batch, spec.input_resolution, text_length)
    cuda = device.startswith("cuda")
    if cuda:
        inputs = StepInputs(inputs.pixels.to(device), inputs.token_ids.to(device), inputs.positives.to(device))

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def one_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        step_gradients(model, inputs, train_vision=stage == 2, chunk=chunk, autocast=autocast)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()

    one_step()  # warm-up: allocator, AdamW state
    times = []
    with PeakMemory() as peak:
        for _ in range(steps):
            start = time.perf_counter()
            one_step()
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    mib = peak.extra_bytes / 2**20 if peak.supported else None
    return Point(model_name if not cuda else f"{model_name} (CUDA bf16)", mode, batch, chunk, steps, seconds,
                 batch / seconds, mib)


def image_pipeline_rate(resolution: int, count: int) -> float:
    """Images/s of decode (256x256 JPEG) + cn_clip's exact transform on one core."""
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, format="JPEG")
        blobs.append(buf.getvalue())
    transform = ImageTransform(resolution)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for i in range(count):
            transform(load_image(blobs[i % len(blobs)]))
        return count / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the points as JSON here")
    ap.add_argument("--quick", action="store_true", help="small batches and one timed step (a smoke run)")
    ap.add_argument("--text-length", type=int, default=24, help="tokens per caption (after trimming padding)")
    args = ap.parse_args(argv)
    plan = ([("tiny", 16, 2, "cpu"), ("ViT-B-16", 4, 1, "cpu")] if args.quick else
            [("tiny", 64, 5, "cpu"), ("ViT-B-16", 16, 2, "cpu")])
    gpu_skipped = None
    if torch.cuda.is_available():
        plan.append(("ViT-B-16", 16 if args.quick else 128, 2 if args.quick else 5, "cuda"))
    else:
        gpu_skipped = "no CUDA GPU visible to torch: the ViT-B-16 bf16 row runs only on a GPU machine"
        print(f"GPU row skipped: {gpu_skipped}")
    cpu = cpu_info()
    print(f"CPU: {cpu.model} ({', '.join(cpu.flags) or 'no reported ISA flags'}), torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}")
    points: list[Point] = []
    for model_name, batch, steps, device in plan:
        plain = None
        for mode in ("stage2", "stage2-gradcache", "stage1"):
            point = time_steps(model_name, mode, batch, steps, args.text_length, device)
            if mode == "stage2":
                plain = point
            point.ratio_to_plain = point.pairs_per_s / plain.pairs_per_s
            points.append(point)
            mem = f"{point.peak_extra_mib:8.0f}" if point.peak_extra_mib is not None else "     n/a"
            print(f"{model_name:9} {mode:17} batch {batch:3} chunk {str(point.chunk):4} "
                  f"{point.seconds_per_step:8.3f} s/step {point.pairs_per_s:8.2f} pairs/s "
                  f"x{point.ratio_to_plain:.2f} vs plain  peak +{mem} MiB")
    images_per_s = image_pipeline_rate(224, 64 if args.quick else 256)
    print(f"image pipeline (decode 256x256 JPEG + transform to 224, one core): {images_per_s:.1f} images/s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"cpu": cpu.as_dict(), "torch_threads": torch.get_num_threads(),
                                        "torch": torch.__version__, "quick": args.quick,
                                        "text_length": args.text_length,
                                        "points": [asdict(p) for p in points], "gpu_skipped": gpu_skipped,
                                        "image_pipeline_images_per_s": images_per_s}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
