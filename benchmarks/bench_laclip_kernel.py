"""Native LACLIP kernel (engine.ops) vs the pure-PyTorch reference (engine.laclip), in the same run, on the CPU.

Run:  python -m pytest benchmarks/bench_laclip_kernel.py --benchmark-only -q
Cases: Q in {1, 64}, D = 512, K = 4, N in {10k, 100k}, fp32, fp16 and bf16 inputs (bf16: crop storage that CPUs
with the AVX-512 BF16 dot-product instruction score without conversion), "image" and "text" weights, top-10 and
full scores. The reference's top-k is torch.topk on its score matrix (what a PyTorch user writes); for fp16/bf16
inputs the reference upcasts to fp32 as laclip_scores_reference does.
Each benchmark's extra_info records:
  gflops          2 Q N K D / time (the crop dot products; the global term and softmax are not counted)
  crop_gbs        N K D bytes / time (crop bytes read once)
  gemm_fraction   gflops / machine fp32 GEMM rate (benchmarks.machine.gemm_gflops), whatever the input dtype
  read_fraction   crop_gbs / machine read bandwidth (benchmarks.machine.read_bandwidth_gbs)
  peak_extra_mb   extra resident memory of one call (peak RSS during the call minus RSS before it, outputs
                  included; benchmarks.machine.PeakMemory), measured once outside the timed runs
  theory_extra_mb what the implementation allocates by design (kernel: outputs + per-thread tile buffers + heaps;
                  reference: its [Q, N, K] / [Q, N] intermediates)
Grouped by case, so pytest-benchmark's table shows kernel and reference side by side; a markdown summary with
speed-ups is written to bench-out/laclip_kernel.md and printed at the end of the run.
"""
from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from benchmarks import machine
from engine import ops
from engine.laclip import laclip_scores_reference

pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="engine._laclip_ext not built")

D, K, TOPK = 512, 4, 10
RESULTS: dict[tuple, dict] = {}
SUMMARY_PATH = Path(__file__).resolve().parent.parent / "bench-out" / "laclip_kernel.md"
_DATA: dict[int, dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]]] = {}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def gallery(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded L2-normalised G [n, D] and C [n, K, D]; only one gallery size is kept in memory at a time."""
    if n not in _DATA:
        _DATA.clear()
        gc.collect()
        gen = torch.Generator().manual_seed(n)
        g = torch.randn(n, D, generator=gen)
        c = torch.randn(n, K, D, generator=gen)
        g /= g.norm(dim=-1, keepdim=True)
        c /= c.norm(dim=-1, keepdim=True)
        _DATA[n] = {dtype: (g.to(dtype), c.to(dtype)) for dtype in DTYPES.values()}
    return _DATA[n][dtype]


def queries(q: int, dtype: torch.dtype) -> torch.Tensor:
    t = torch.randn(q, D, generator=torch.Generator().manual_seed(q))
    return (t / t.norm(dim=-1, keepdim=True)).to(dtype)


def reference_call(t, g, c, weights: str, op: str):
    def run():
        scores = laclip_scores_reference(t, g, c, alpha=0.5, tau=0.1, weights=weights)
        return torch.topk(scores, TOPK, dim=1) if op == "top10" else scores
    return run


def kernel_call(t, g, c, weights: str, op: str):
    if op == "top10":
        return lambda: ops.laclip_topk(t, g, c, k=TOPK, alpha=0.5, tau=0.1, weights=weights)
    return lambda: ops.laclip_scores(t, g, c, alpha=0.5, tau=0.1, weights=weights)


def theory_extra_bytes(impl: str, q: int, n: int, op: str) -> int:
    out = q * n * 4 if op == "scores" else q * TOPK * 12
    if impl == "reference":  # global [Q,N]; crop sims, weights, product [Q,N,K]; scores [Q,N]
        return 3 * q * n * K * 4 + 2 * q * n * 4 + out
    threads = torch.get_num_threads()
    tile = 48  # images per tile for K=4, D=512 (csrc/laclip_cpu.cpp tile_images)
    per_thread = (2 * tile * (K + 1) * D + min(q, 64) * tile * (K + 1) + tile) * 4
    heaps = threads * q * TOPK * 12 if op == "top10" else 0
    return out + threads * per_thread + heaps


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("op", ["top10", "scores"])
@pytest.mark.parametrize("weights", ["text", "image"])
@pytest.mark.parametrize("q", [1, 64], ids=lambda q: f"Q{q}")
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("n", [10_000, 100_000], ids=lambda n: f"N{n // 1000}k")
def test_laclip_kernel(benchmark, impl: str, n: int, q: int, dtype: torch.dtype, weights: str, op: str) -> None:
    g, c = gallery(n, dtype)
    t = queries(q, dtype)
    fn = (kernel_call if impl == "kernel" else reference_call)(t, g, c, weights, op)
    dname = next(name for name, value in DTYPES.items() if value == dtype)
    benchmark.group = f"N={n} Q={q} {dname} {weights} {op}"
    slow = impl == "reference" and q * n >= 64 * 100_000
    benchmark.pedantic(fn, rounds=3 if slow else 7, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.min
    extra = machine.peak_extra_bytes(fn)
    gflops = 2 * q * n * K * D / seconds / 1e9
    crop_gbs = n * K * D * c.element_size() / seconds / 1e9
    info = {
        "seconds_min": seconds,
        "gflops": round(gflops, 2),
        "crop_gbs": round(crop_gbs, 2),
        "gemm_fraction": round(gflops / machine.gemm_gflops(), 3),
        "read_fraction": round(crop_gbs / machine.read_bandwidth_gbs(), 3),
        "peak_extra_mb": None if extra is None else round(extra / 1e6, 1),
        "theory_extra_mb": round(theory_extra_bytes(impl, q, n, op) / 1e6, 1),
        "machine_gemm_gflops": round(machine.gemm_gflops(), 1),
        "machine_read_gbs": round(machine.read_bandwidth_gbs(), 1),
        "threads": torch.get_num_threads(),
        "cpu_isa": ops.cpu_isa(),
    }
    benchmark.extra_info.update(info)
    RESULTS[(n, q, dname, weights, op, impl)] = info


def test_machine_limits(benchmark) -> None:
    """The machine's fp32 GEMM rate and memory bandwidths (the denominators of the fractions above)."""
    benchmark.group = "machine limits"
    info = {"gemm_gflops": machine.gemm_gflops(), "gemm_gflops_1thread": machine.gemm_gflops(1),
            "read_gbs": machine.read_bandwidth_gbs(), "copy_gbs": machine.copy_bandwidth_gbs(),
            "threads": torch.get_num_threads()}
    a = torch.randn(2048, 2048)
    benchmark.pedantic(lambda: a @ a, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({k: round(v, 2) for k, v in info.items()})
    RESULTS[("machine",)] = info


def summary_markdown() -> str:
    """Markdown table of kernel vs reference (empty when no kernel case ran)."""
    rows = []
    for key in sorted(k for k in RESULTS if len(k) == 6 and k[5] == "kernel"):
        n, q, dname, weights, op, _ = key
        kern, ref = RESULTS[key], RESULTS.get(key[:5] + ("reference",))
        ref_ms = f"{ref['seconds_min'] * 1e3:.1f}" if ref else "-"
        speedup = f"{ref['seconds_min'] / kern['seconds_min']:.2f}x" if ref else "-"
        ref_mem = ref["peak_extra_mb"] if ref else "-"
        rows.append(f"| {n // 1000}k | {q} | {dname} | {weights} | {op} | {kern['seconds_min'] * 1e3:.1f} | {ref_ms} | "
                    f"{speedup} | {kern['gflops']:.1f} | {kern['gemm_fraction']:.0%} | {kern['crop_gbs']:.1f} | "
                    f"{kern['read_fraction']:.0%} | {kern['peak_extra_mb']} / {ref_mem} |")
    if not rows:
        return ""
    head = (f"Machine: {torch.get_num_threads()} threads, fp32 GEMM {machine.gemm_gflops():.1f} GFLOP/s, "
            f"read {machine.read_bandwidth_gbs():.1f} GB/s, copy {machine.copy_bandwidth_gbs():.1f} GB/s; "
            f"CPU path {ops.cpu_isa()}\n\n"
            "| N | Q | dtype | weights | op | kernel ms | reference ms | speed-up | kernel GFLOP/s | of GEMM | "
            "crop GB/s | of read BW | peak extra MB kernel / reference |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join(rows) + "\n"


def write_summary() -> str:
    """Write the markdown summary to bench-out/laclip_kernel.md and return it."""
    text = summary_markdown()
    if text:
        SUMMARY_PATH.parent.mkdir(parents=True, exist_ok=True)
        SUMMARY_PATH.write_text(text)
    return text
