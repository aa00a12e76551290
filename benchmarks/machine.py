"""Machine limits measured with PyTorch, so kernel figures can be reported as fractions of what this machine does.

gemm_gflops: best fp32 torch.mm 2048 x 2048 rate (GFLOP/s, 2 n^3 flops).
read_bandwidth_gbs: best torch.sum over a 512 MiB fp32 tensor (GB/s of bytes read).
copy_bandwidth_gbs: best copy of a 256 MiB tensor into another (GB/s of bytes read + written, STREAM-copy style).
PeakMemory: extra resident memory of a call (the process's peak RSS during it minus RSS before it).
Results are cached per process (each function runs its measurement once).
"""
from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Any

import torch

from export.timing import best_time

__all__ = ["gemm_gflops", "read_bandwidth_gbs", "copy_bandwidth_gbs", "best_time", "PeakMemory", "peak_extra_bytes"]


def gemm_gflops(threads: int | None = None, n: int = 2048) -> float:
    """Best fp32 GEMM rate of torch.mm (n x n x n) in GFLOP/s, with `threads` intra-op threads (None: current)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
        out = torch.empty(n, n)
        seconds = best_time(lambda: torch.mm(a, b, out=out), repeats=7, warmup=2)
    finally:
        torch.set_num_threads(before)
    return 2 * n**3 / seconds / 1e9


@functools.lru_cache(maxsize=None)
def read_bandwidth_gbs(mib: int = 512) -> float:
    """Best memory read bandwidth (GB/s) of torch.sum over an fp32 tensor of `mib` MiB."""
    x = torch.ones(mib * (1 << 20) // 4)
    seconds = best_time(lambda: x.sum(), repeats=7, warmup=2)
    return x.numel() * 4 / seconds / 1e9


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbs(mib: int = 256) -> float:
    """Best copy bandwidth (GB/s, bytes read + bytes written) of dst.copy_(src) for `mib` MiB tensors."""
    src = torch.ones(mib * (1 << 20) // 4)
    dst = torch.empty_like(src)
    seconds = best_time(lambda: dst.copy_(src), repeats=7, warmup=2)
    return 2 * src.numel() * 4 / seconds / 1e9


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _trim_heap() -> None:
    try:  # return freed heap pages to the OS so reused free blocks do not hide new allocations
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Context manager measuring the extra resident memory (bytes) used inside it: peak RSS minus RSS on entry.

    Linux only: resets the peak-RSS counter (VmHWM) by writing 5 to /proc/self/clear_refs, then reads VmHWM on
    exit. Sees every allocation that touches memory (torch's CPU allocator included), unlike tracemalloc. Pages
    already resident (e.g. reused by the allocator) are not counted, so it is a lower bound on what is allocated;
    `supported` is False when the counter cannot be reset.
    """

    def __enter__(self) -> "PeakMemory":
        _trim_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.supported = True
        except OSError:
            self.supported = False
        self._start = _status_kib("VmRSS") if self.supported else 0
        self.extra_bytes = 0
        return self

    def __exit__(self, *exc: object) -> None:
        if self.supported:
            self.extra_bytes = max(0, _status_kib("VmHWM") - self._start) * 1024


def peak_extra_bytes(fn: Callable[[], Any]) -> int | None:
    """Extra peak resident bytes of one fn() call (None where the peak counter cannot be reset)."""
    with PeakMemory() as peak:
        result = fn()
    del result
    return peak.extra_bytes if peak.supported else None


if __name__ == "__main__":
    print(f"threads            {torch.get_num_threads()}")
    print(f"fp32 GEMM          {gemm_gflops():.1f} GFLOP/s")
    print(f"read bandwidth     {read_bandwidth_gbs():.1f} GB/s")
    print(f"copy bandwidth     {copy_bandwidth_gbs():.1f} GB/s (read + write)")
