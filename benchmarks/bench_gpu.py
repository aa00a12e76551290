"""The GPU benchmark: one run on a CUDA machine measures the ceilings and every GPU target of the engine against
them, in the same run.

    python -m benchmarks.bench_gpu --out bench-out/gpu [--sections ceil,kernel,towers,index,e2e] [--photos DIR]
    python -m benchmarks.bench_gpu --smoke-cpu      # every section at toy sizes on the CPU (checks the script)

Sections (each guarded: an error is recorded and the next runs; results.json is rewritten after each one):
  ceil    device copy and read bandwidth, bf16 GEMM rate, host-to-device pageable and pinned
  kernel  LACLIP laclip_topk on resident rows, N = 1M and 10M, K = 4, D = 512, Q = 1 and 64, plain / image / text
          weights: p50 ms, GB/s and fraction of the read ceiling, error against float64 truth on sampled images,
          top-10 equal to the CPU kernel on the same rows (1M), torch-on-GPU baseline
  towers  ViT-B-16 (random weights) fp16/bf16 vs fp32 parity, tower-only images/s at batch 256 (fraction of the
          bf16 GEMM rate at 35 GFLOP per image) and texts/s at 8 tokens batch 256; bf16-compiled text on CUDA
  index   an index of N rows (fp16, K = 4) opened on the GPU: first (streamed) query, residency time, exact
          search Q = 1 k = 10 p50 per mode, top-10 agreement with the CPU index
  e2e     1,000 640x480 JPEGs -> device views (nvJPEG, K = 4 crops) -> ViT-B-16 fp16 -> index rows: images/s,
          with each stage's ms per image; per-vector parity of device views with the PIL path on real photos
          (--photos) or generated ones
  compiled  the bf16-compiled vision tower (TorchInductor) on the device: compile time and images/s (last: it
          compiles for a minute or more)
Without a GPU (and without --smoke-cpu) it exits 0 after saying why, so CI never needs one.
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

D, K = 512, 4
DEV = torch.device("cuda")
SMOKE = False
RESULTS: dict = {}
SUMMARY: list[str] = []


def note(line: str) -> None:
    SUMMARY.append(line)
    print(line, flush=True)


def event_ms(fn, warmup: int = 2, reps: int = 10) -> float:
    """Median ms of `fn` timed with CUDA events after `warmup` calls (wall clock on the CPU)."""
    if DEV.type != "cuda":
        return wall_ms(fn, reps=2)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def wall_ms(fn, reps: int = 5) -> float:
    """Median wall ms of a call that returns host data (so it synchronises itself)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def unit_(x: torch.Tensor) -> torch.Tensor:
    return x.div_(x.float().norm(dim=-1, keepdim=True).to(x.dtype))


def gallery(n: int, dtype: torch.dtype, seed: int = 0, chunk: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Random unit G [n, D] and crops C [n, K, D] near their image (cosine ~0.85), made on the device in chunks."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    g = torch.empty(n, D, dtype=dtype, device=DEV)
    c = torch.empty(n, K, D, dtype=dtype, device=DEV)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        base = unit_(torch.randn(e - s, D, device=DEV, generator=gen))
        g[s:e] = base.to(dtype)
        noise = 0.6 * torch.randn(e - s, K, D, device=DEV, generator=gen) / D ** 0.5
        c[s:e] = unit_(base[:, None] + noise).to(dtype)
    return g, c


# ----------------------------------------------------------------------------------------------------- ceilings
def sec_ceil() -> None:
    n = (1 << 30) if not SMOKE else (1 << 20)
    x = torch.randn(n, device=DEV)
    y = torch.empty_like(x)
    copy = 2 * n * 4 / event_ms(lambda: y.copy_(x)) / 1e6
    read = n * 4 / event_ms(lambda: x.sum()) / 1e6
    del x, y
    m = 8192 if not SMOKE else 256
    a = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    tflops = 2 * m ** 3 / event_ms(lambda: a @ b) / 1e9
    host = torch.randn(n // 4)
    h2d = host.numel() * 4 / wall_ms(lambda: host.to(DEV).sum().item(), reps=3) / 1e6
    pinned = host.pin_memory() if DEV.type == "cuda" else host
    h2d_pinned = pinned.numel() * 4 / wall_ms(lambda: pinned.to(DEV, non_blocking=True).sum().item(), reps=3) / 1e6
    RESULTS["ceilings"] = dict(copy_GBps=copy, read_GBps=read, bf16_gemm_TFLOPs=tflops, h2d_pageable_GBps=h2d,
                               h2d_pinned_GBps=h2d_pinned)
    note(f"ceilings: copy {copy:.0f} GB/s, read {read:.0f} GB/s, bf16 GEMM {tflops:.0f} TFLOP/s, "
         f"H2D pageable {h2d:.1f} / pinned {h2d_pinned:.1f} GB/s")


# ------------------------------------------------------------------------------------------------------- kernel
def torch_text_topk(t, g, c, alpha, tau, k=10, chunk=1 << 20):
    """Query-aware LACLIP written with cuBLAS and torch ops on the GPU (the baseline), then torch.topk."""
    out = torch.empty(t.shape[0], g.shape[0], device=DEV)
    for s in range(0, g.shape[0], chunk):
        e = min(g.shape[0], s + chunk)
        sims = (c[s:e].reshape(-1, D) @ t.T).float().view(e - s, K, -1)
        w = torch.softmax(sims / tau, dim=1)
        out[:, s:e] = (alpha * (g[s:e] @ t.T).float() + (1 - alpha) * (w * sims).sum(1)).T
    return torch.topk(out, k, dim=1)


def sec_kernel(sizes: list[int]) -> None:
    from engine import ops
    from engine.laclip import laclip_scores_reference

    read = RESULTS.get("ceilings", {}).get("read_GBps")
    rows = []
    for n in sizes:
        for dtype in ([torch.float16, torch.bfloat16] if n <= 1_000_000 else [torch.float16]):
            g, c = gallery(n, dtype, seed=n)
            host = (g.cpu(), c.cpu()) if n <= 1_000_000 and dtype == torch.float16 else None
            for q in (1, 64):
                t = unit_(torch.randn(q, D, device=DEV)).to(dtype)
                for mode in ("plain", "image", "text"):
                    if mode == "plain" and q == 64:
                        continue
                    kw = dict(alpha=1.0 if mode == "plain" else 0.5, tau=0.1,
                              weights="image" if mode == "image" else "text")
                    crops = g[:, None] if mode == "plain" else c
                    nbytes = (g.numel() + (0 if mode == "plain" else c.numel())) * g.element_size()
                    # float64 truth on 4096 sampled images, the last rows included (64-bit addressing at 10M)
                    idx = torch.cat([torch.randint(0, n, (min(n, 4090),), device=DEV), torch.arange(n - 6, n, device=DEV)])
                    truth = laclip_scores_reference(t.double(), g[idx].double(), crops[idx].double(), **kw)
                    err = (ops.laclip_scores(t, g[idx], crops[idx], **kw).double() - truth).abs().max().item()
                    values, ind = ops.laclip_topk(t, g, crops, k=10, **kw)
                    cpu_equal = None
                    if host is not None:
                        qs = min(q, 4)
                        hc = host[0][:, None] if mode == "plain" else host[1]
                        _, cpu_ind = ops.laclip_topk(t[:qs].cpu(), host[0], hc, k=10, **kw)
                        cpu_equal = bool(torch.equal(cpu_ind, ind[:qs].cpu()))
                    ms = event_ms(lambda: ops.laclip_topk(t, g, crops, k=10, **kw), reps=7)
                    base = None
                    if mode == "text":
                        base = event_ms(lambda: torch_text_topk(t, g, c, 0.5, 0.1), reps=3)
                    elif mode == "plain":
                        base = event_ms(lambda: torch.topk((t @ g.T).float(), 10, dim=1), reps=5)
                    gbs = nbytes / ms / 1e6
                    row = dict(n=n, dtype=str(dtype).split(".")[-1], q=q, mode=mode, err=err, cpu_top10_equal=cpu_equal,
                               topk_ms=ms, torch_gpu_ms=base, GBps=gbs, of_read=gbs / read if read else None)
                    rows.append(row)
                    RESULTS["kernel"] = rows
                    note(f"kernel N={n:>8} {row['dtype']} Q={q:>2} {mode:5}: top10 {ms:7.2f} ms ({gbs:5.0f} GB/s"
                         f"{f', {gbs / read:.0%} of read' if read else ''}), err {err:.1e}, CPU top10 equal "
                         f"{cpu_equal}, torch-GPU {base if base is None else round(base, 2)} ms")
            del g, c, host
            if DEV.type == "cuda":
                torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------- towers
def sec_towers() -> None:
    from engine.backends.torch_backend import TorchEncoder
    from engine.models import build_random_model, get_spec

    name = "tiny" if SMOKE else "ViT-B-16"
    spec = get_spec(name)
    model = build_random_model(spec)
    res = spec.input_resolution
    precisions = ("fp32", "bf16") if DEV.type == "cpu" else ("fp32", "fp16", "bf16")
    encs = {p: TorchEncoder(model, res, device=DEV.type, precision=p) for p in precisions}
    gen = torch.Generator().manual_seed(0)
    px = torch.randn(16, 3, res, res, generator=gen)
    ids = torch.randint(672, 7992, (16, 24), generator=gen)
    ids[:, 0], ids[:, -1] = 101, 102
    ids[8:, 12:] = 0
    ref_i, ref_t = encs["fp32"].encode_images(px), encs["fp32"].encode_texts(ids)
    parity = {p: (float((encs[p].encode_images(px) * ref_i).sum(1).min()),
                  float((encs[p].encode_texts(ids) * ref_t).sum(1).min())) for p in precisions[1:]}
    RESULTS["tower_parity_min_cos"] = parity
    note("towers parity (min cos vs fp32, image/text): " + ", ".join(f"{p} {a:.5f}/{b:.5f}" for p, (a, b) in parity.items()))
    peak = RESULTS.get("ceilings", {}).get("bf16_gemm_TFLOPs")
    rows = []
    batch = 8 if SMOKE else 256
    for p in precisions[1:]:
        enc = encs[p]
        x = torch.randn(batch, 3, res, res, generator=gen).to(DEV)

        def vision() -> None:
            with torch.inference_mode(), enc._autocast():
                enc._image_tower(x)
        rate = batch / event_ms(vision, reps=5) * 1e3
        tflops = rate * 35e9 / 1e12
        t_ids = torch.randint(672, 7992, (batch, 8), generator=gen)
        t_ids[:, 0], t_ids[:, -1] = 101, 102
        t_dev = t_ids.to(DEV)

        def text() -> None:
            with torch.inference_mode(), enc._autocast("text"):
                enc._text_tower(t_dev)
        text_rate = batch / event_ms(text, reps=5) * 1e3

        def text_unmasked() -> None:  # the same layers without the padding mask (no row is padded here)
            from engine.towers import _bert_layer

            with torch.inference_mode(), enc._autocast("text"):
                tower = enc._text_tower
                h = tower.bert.embeddings(t_dev)
                *layers, last = tower.bert.encoder.layer
                for layer in layers:
                    h = _bert_layer(layer, h, None)
                _bert_layer(last, h, None, first_token_only=True)
        unmasked_rate = batch / event_ms(text_unmasked, reps=5) * 1e3
        e2e_rate = batch / wall_ms(lambda: enc.encode_images(x.cpu()), reps=3) * 1e3
        RESULTS.setdefault("tower_profiles", {})[p] = {"vision": top_kernels(vision), "text": top_kernels(text),
                                                       "text_unmasked": top_kernels(text_unmasked)}
        rows.append(dict(precision=p, batch=batch, images_s=rate, tflops=tflops, of_bf16_peak=tflops / peak if peak else None,
                         texts_s_8tok=text_rate, texts_s_8tok_unmasked=unmasked_rate, images_s_from_host=e2e_rate))
        note(f"towers {p}: vision b={batch} {rate:8.0f} img/s ({tflops:.0f} TFLOP/s"
             f"{f', {tflops / peak:.0%} of bf16 GEMM' if peak else ''}; {e2e_rate:.0f} img/s from host pixels), "
             f"text 8 tokens b={batch} {text_rate:8.0f} texts/s ({unmasked_rate:.0f} without the mask)")
        RESULTS["tower_rates"] = rows
    try:
        enc = TorchEncoder(model, res, device=DEV.type, precision="bf16-compiled")
        cos = float((enc.encode_texts(ids) * ref_t).sum(1).min())
        RESULTS["bf16_compiled_text_min_cos"] = cos
        note(f"bf16-compiled text tower on {DEV.type}: min cos {cos:.5f}")
    except Exception as exc:
        RESULTS["bf16_compiled_text_min_cos"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        note(f"bf16-compiled text tower FAILED: {RESULTS['bf16_compiled_text_min_cos']}")


def top_kernels(fn, count: int = 8) -> list[str]:
    """The device kernels taking most of 3 calls of `fn` (torch.profiler): 'name: total ms (calls)'."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    activity = ProfilerActivity.CUDA if DEV.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(3):
            fn()
        if DEV.type == "cuda":
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0 or DEV.type != "cuda"]
    key = (lambda e: e.device_time_total) if DEV.type == "cuda" else (lambda e: e.self_cpu_time_total)
    events.sort(key=key, reverse=True)
    return [f"{e.key[:70]}: {key(e) / 1e3:.2f} ms ({e.count})" for e in events[:count]]


def sec_compiled() -> None:
    """bf16-compiled (TorchInductor, frozen weights, one graph per batch bucket) vision tower on the device."""
    from engine.backends.torch_backend import TorchEncoder
    from engine.models import build_random_model, get_spec

    name = "tiny" if SMOKE else "ViT-B-16"
    spec = get_spec(name)
    enc = TorchEncoder(build_random_model(spec), spec.input_resolution, device=DEV.type, precision="bf16-compiled")
    batch = 8 if SMOKE else 256
    x = enc._inputs(torch.randn(batch, 3, spec.input_resolution, spec.input_resolution))  # bf16 on the device
    t0 = time.perf_counter()
    with torch.inference_mode():
        enc._image_tower(x)
    compile_s = time.perf_counter() - t0

    def vision() -> None:
        with torch.inference_mode():
            enc._image_tower(x)
    rate = batch / event_ms(vision, reps=5) * 1e3
    peak = RESULTS.get("ceilings", {}).get("bf16_gemm_TFLOPs")
    RESULTS["compiled_vision"] = dict(batch=batch, compile_s=compile_s, images_s=rate, tflops=rate * 35e9 / 1e12)
    note(f"bf16-compiled vision b={batch}: {rate:8.0f} img/s ({rate * 35e9 / 1e12:.0f} TFLOP/s"
         f"{f', {rate * 35e9 / 1e12 / peak:.0%} of bf16 GEMM' if peak else ''}), compiled in {compile_s:.0f} s")


# -------------------------------------------------------------------------------------------------------- index
def sec_index(n: int) -> None:
    from engine.index import AnnConfig, Index, IndexManifest
    from engine.laclip import LaclipConfig, ScoreConfig

    g, c = gallery(n, torch.float16, seed=7)
    root = Path(tempfile.mkdtemp()) / "idx"
    manifest = IndexManifest("synthetic", "bench-gpu", D, LaclipConfig(num_crops=K), dtype="float16",
                             ann=AnnConfig(kind="none"))
    t0 = time.perf_counter()
    index = Index.create(root, manifest)
    step = (n + 1) // 2  # two segments: the scan's per-segment work is part of what is timed
    for s in range(0, n, step):
        e = min(n, s + step)
        index.add_images(list(range(s, e)), g[s:e].float().cpu().numpy(), c[s:e].float().cpu().numpy())
    RESULTS["index_build_s"] = time.perf_counter() - t0
    q = g[:16].float().cpu().numpy() + 0.05 * np.random.default_rng(1).standard_normal((16, D)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    del g, c
    gpu, cpu = Index.open(root, device=DEV.type), Index.open(root)
    rows = []
    for mode, score in (("plain", ScoreConfig(alpha=1.0)), ("image", ScoreConfig(0.1, 0.5, "image")),
                        ("text", ScoreConfig(0.1, 0.5, "text"))):
        t0 = time.perf_counter()
        gpu.search_images(q[:1], 10, score=score, exact=True)  # streamed while the columns upload
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        if gpu.place.resident is not None:
            gpu.place.resident.wait()
        gpu.search_images(q[:1], 10, score=score, exact=True)  # pooled columns are made on the device here
        resident_s = time.perf_counter() - t0
        ms1 = wall_ms(lambda: gpu.search_images(q[:1], 10, score=score, exact=True), reps=21)
        ms16 = wall_ms(lambda: gpu.search_images(q, 10, score=score, exact=True), reps=5)
        cpu_ms = wall_ms(lambda: cpu.search_images(q[:1], 10, score=score, exact=True), reps=2)
        a = gpu.search_images(q[:4], 10, score=score, exact=True)
        b = cpu.search_images(q[:4], 10, score=score, exact=True)
        agree = float(np.mean([len(set(x.rows) & set(y.rows)) / 10 for x, y in zip(a, b)]))
        rows.append(dict(n=n, mode=mode, first_query_s=first, to_resident_s=resident_s, gpu_q1_p50_ms=ms1,
                         gpu_q16_ms=ms16, cpu_q1_ms=cpu_ms, top10_agree_with_cpu=agree))
        RESULTS["index"] = rows
        note(f"index N={n} {mode:5}: first {first:5.2f} s, resident after {resident_s:5.2f} s, GPU Q=1 p50 "
             f"{ms1:6.2f} ms, Q=16 {ms16:6.2f} ms, CPU Q=1 {cpu_ms:7.1f} ms, top10 agree {agree:.3f}")


# ---------------------------------------------------------------------------------------------------------- e2e
def _photo_jpegs(count: int, size: tuple[int, int], photos: Path | None) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    sources = []
    if photos is not None and photos.is_dir():
        sources = [Image.open(p).convert("RGB") for p in sorted(photos.iterdir())
                   if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    out = []
    for i in range(count):
        if sources:
            image = sources[i % len(sources)].resize(size)
        else:
            y, x = np.mgrid[0:size[1], 0:size[0]].astype(np.float32)
            base = np.stack([128 + 100 * np.sin(x / (30 + 7 * ch + i % 13) + y / 41 + ch) for ch in range(3)], -1)
            image = Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def sec_e2e(count: int, photos: Path | None) -> None:
    from engine.backends.torch_backend import TorchEncoder
    from engine.device_views import DeviceViewMaker
    from engine.index import AnnConfig, Index, IndexManifest
    from engine.laclip import CropConfig, LaclipConfig
    from engine.models import build_random_model, get_spec
    from engine.preprocess import ImageTransform, load_image

    name = "tiny" if SMOKE else "ViT-B-16"
    spec = get_spec(name)
    model = build_random_model(spec)
    res = spec.input_resolution
    # parity of device views with the PIL path, per vector, through the fp32 tower (grid crops: the same boxes)
    grid = CropConfig(num_crops=K, crop_mode="grid")
    ref_enc = TorchEncoder(model, res, device=DEV.type, precision="fp32")
    blobs = _photo_jpegs(20 if not SMOKE else 3, (640, 480), photos)
    maker = DeviceViewMaker(res, grid, device=DEV.type)
    transform = ImageTransform(res)
    from engine.laclip import crop_boxes
    cos = []
    for blob in blobs:
        image = load_image(blob)
        boxes = crop_boxes(image.width, image.height, grid, 0)
        pil = transform.normalise(torch.cat([transform.resized(image)[None], transform.resized_crops(image, boxes)]))
        dev = maker([blob]).views[0]
        a, b = ref_enc.encode_images(pil), ref_enc.encode_images(dev)
        cos.append((a * b).sum(1))
    cos = np.stack(cos)
    RESULTS["device_views_parity"] = dict(images=len(blobs), real_photos=bool(photos and photos.is_dir()),
                                          global_min=float(cos[:, 0].min()), crops_min=float(cos[:, 1:].min()),
                                          mean=float(cos.mean()))
    note(f"device views vs PIL path ({len(blobs)} {'real' if photos and photos.is_dir() else 'generated'} photos, "
         f"fp32 tower): global min cos {cos[:, 0].min():.5f}, crops min {cos[:, 1:].min():.5f}, mean {cos.mean():.5f}")

    precision = "bf16" if DEV.type == "cpu" else "fp16"
    enc = TorchEncoder(model, res, device=DEV.type, precision=precision)
    blobs = _photo_jpegs(count, (640, 480), photos)
    maker = DeviceViewMaker(res, LaclipConfig(num_crops=K).crops, device=DEV.type)
    root = Path(tempfile.mkdtemp()) / "e2e"
    index = Index.create(root, IndexManifest(name, "bench-gpu", enc.embed_dim, LaclipConfig(num_crops=K),
                                             dtype="float16", ann=AnnConfig(kind="none")))
    # where a batch's time goes (synchronised after each stage; the timed run below does not synchronise)
    sync = torch.cuda.synchronize if DEV.type == "cuda" else (lambda: None)
    part = blobs[:64]
    stages = {}
    t0 = time.perf_counter()
    decoded = maker.decode(part)
    sync()
    stages["decode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    views = maker.views(decoded)
    sync()
    stages["views"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    maker.thumbnails([p for p, _ in decoded])
    stages["thumbnails"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    enc.encode_images(views.flatten(0, 1))
    stages["tower"] = time.perf_counter() - t0
    RESULTS["e2e_stage_ms_per_image"] = {k: v * 1e3 / len(part) for k, v in stages.items()}
    note("e2e stages, ms per image (64-image batch): " + ", ".join(f"{k} {v * 1e3 / len(part):.3f}" for k, v in stages.items()))
    batch = 64
    spent = {"views": 0.0, "tower": 0.0, "index": 0.0}
    maker(blobs[:2]), enc.encode_images(maker(blobs[:2]).views.flatten(0, 1))  # warm up
    t_start = time.perf_counter()
    for s in range(0, count, batch):
        chunk = blobs[s:s + batch]
        t0 = time.perf_counter()
        made = maker(chunk, thumbnails=True)
        t1 = time.perf_counter()
        flat = enc.encode_images(made.views.flatten(0, 1)).reshape(len(chunk), 1 + K, -1)
        t2 = time.perf_counter()
        index.add_images(list(range(s, s + len(chunk))), flat[:, 0], flat[:, 1:], thumbnails=made.thumbnails)
        t3 = time.perf_counter()
        spent["views"] += t1 - t0
        spent["tower"] += t2 - t1
        spent["index"] += t3 - t2
    total = time.perf_counter() - t_start
    RESULTS["e2e"] = dict(images=count, images_s=count / total, **{f"{k}_share": v / total for k, v in spent.items()})
    note(f"e2e {count} JPEGs 640x480 -> device views (K={K}) -> {name} {precision} -> index: {count / total:.0f} images/s "
         f"(views {spent['views'] / total:.0%}, tower {spent['tower'] / total:.0%}, index {spent['index'] / total:.0%})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/gpu"))
    ap.add_argument("--sections", default="ceil,kernel,towers,index,e2e,compiled")
    ap.add_argument("--kernel-sizes", default="1000000,10000000")
    ap.add_argument("--index-rows", type=int, default=1_000_000)
    ap.add_argument("--e2e-images", type=int, default=1000)
    ap.add_argument("--photos", type=Path, default=None, help="a folder of real photos for the parity check")
    ap.add_argument("--smoke-cpu", action="store_true", help="toy sizes on the CPU: checks the script, not the GPU")
    args = ap.parse_args()
    global DEV, SMOKE
    if args.smoke_cpu:
        DEV, SMOKE = torch.device("cpu"), True
        args.kernel_sizes, args.index_rows, args.e2e_images = "3000", 3000, 6
    elif not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU here; nothing measured (use --smoke-cpu to check the script on the CPU)")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    RESULTS["device"] = torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu (smoke)"
    RESULTS["torch"] = torch.__version__
    steps = {"ceil": sec_ceil, "kernel": lambda: sec_kernel([int(s) for s in args.kernel_sizes.split(",")]),
             "towers": sec_towers, "index": lambda: sec_index(args.index_rows),
             "e2e": lambda: sec_e2e(args.e2e_images, args.photos), "compiled": sec_compiled}
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            steps[name]()
            status = "ok"
        except Exception as exc:  # record it and measure the next section
            status = f"FAILED {type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc()
        RESULTS.setdefault("sections", {})[name] = {"status": status, "seconds": time.perf_counter() - t0}
        print(f"== {name}: {status} ({time.perf_counter() - t0:.1f} s)", flush=True)
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
        (args.out / "results.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    (args.out / "summary.txt").write_text("\n".join(SUMMARY) + "\n")
    print("\n== summary\n" + "\n".join(SUMMARY))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
