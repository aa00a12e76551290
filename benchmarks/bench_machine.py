"""The machine's limits, measured in the suite's own run: best fp32 GEMM rate and memory read / copy bandwidth.

These are the denominators of every "fraction of the machine limit" in the report (benchmarks.machine does the
measuring). Sizes: BENCH_GEMM_N (default 2048) and BENCH_MEM_MIB (default 512 read, half of it for copy).
"""
from __future__ import annotations

import torch

from benchmarks import machine
from benchmarks.params import env_int

GEMM_N = env_int("BENCH_GEMM_N", 2048)
MEM_MIB = env_int("BENCH_MEM_MIB", 512)


def _record(benchmark, limit: str, value: float, unit: str, **extra: object) -> None:
    benchmark.group = "machine limits"
    benchmark.extra_info.update({"limit": limit, "value": round(value, 2), "unit": unit,
                                 "threads": extra.pop("threads", torch.get_num_threads()), **extra})


def test_fp32_gemm(benchmark) -> None:
    """Best torch.mm rate (GFLOP/s) with all intra-op threads; the timed call is one n x n x n product."""
    value = machine.gemm_gflops(n=GEMM_N)
    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    benchmark.pedantic(torch.mm, args=(a, b), rounds=3, iterations=1, warmup_rounds=1)
    _record(benchmark, "fp32 GEMM", value, "GFLOP/s", n=GEMM_N)


def test_fp32_gemm_one_thread(benchmark) -> None:
    """Best single-thread torch.mm rate (GFLOP/s): the per-core limit."""
    value = machine.gemm_gflops(threads=1, n=GEMM_N)
    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        benchmark.pedantic(torch.mm, args=(a, b), rounds=3, iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(before)
    _record(benchmark, "fp32 GEMM, 1 thread", value, "GFLOP/s", n=GEMM_N, threads=1)


def test_read_bandwidth(benchmark) -> None:
    """Best memory read bandwidth (GB/s) of a sum over MEM_MIB MiB."""
    value = machine.read_bandwidth_gbs(mib=MEM_MIB)
    x = torch.ones(MEM_MIB * (1 << 20) // 4)
    benchmark.pedantic(x.sum, rounds=3, iterations=1, warmup_rounds=1)
    _record(benchmark, "memory read", value, "GB/s", mib=MEM_MIB)


def test_copy_bandwidth(benchmark) -> None:
    """Best copy bandwidth (GB/s, read + write) between two MEM_MIB / 2 MiB tensors."""
    mib = max(1, MEM_MIB // 2)
    value = machine.copy_bandwidth_gbs(mib=mib)
    src = torch.ones(mib * (1 << 20) // 4)
    dst = torch.empty_like(src)
    benchmark.pedantic(dst.copy_, args=(src,), rounds=3, iterations=1, warmup_rounds=1)
    _record(benchmark, "memory copy", value, "GB/s", mib=mib)
