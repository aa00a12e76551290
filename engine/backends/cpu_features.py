"""The CPU this process runs on, detected at run time: its model name and the ISA flags that decide which
low-precision kernels are fast here (bf16 dot products, int8 VNNI). Never assumed: the machine changes."""
from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # AMX tiles (Sapphire Rapids+) or AVX-512 BF16 dot products (Zen 4+)
VNNI_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")  # int8 dot products
REPORTED_FLAGS = ("avx2", "fma", "avx512f", *BF16_FLAGS, *VNNI_FLAGS, "avx512_fp16")


@dataclass(frozen=True)
class CpuInfo:
    """CPU model name, the subset of REPORTED_FLAGS it has, and its family/model numbers (CPUs sold under one name,
    e.g. "AMD EPYC" in a VM, span generations: family 25 is Zen 3/4, 23 Zen 2)."""

    model: str
    flags: tuple[str, ...]
    family: str = ""  # e.g. "family 25 model 1" ("" where /proc/cpuinfo does not say)

    @property
    def bf16(self) -> bool:
        """Hardware bf16 dot products (AMX or AVX512-BF16): where bf16 GEMMs beat fp32."""
        return any(f in self.flags for f in BF16_FLAGS)

    @property
    def vnni(self) -> bool:
        """Hardware int8 dot products (VNNI or AMX-INT8)."""
        return any(f in self.flags for f in VNNI_FLAGS)

    def as_dict(self) -> dict[str, object]:
        return {"model": self.model, "flags": list(self.flags), "family": self.family}


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's CPU, from /proc/cpuinfo (platform.processor() and no flags where that is absent)."""
    model, flags, numbers = platform.processor() or platform.machine(), set(), {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("cpu family", "model"):
                numbers.setdefault(key.strip(), value.strip())
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    family = (f"family {numbers['cpu family']} model {numbers['model']}"
              if {"cpu family", "model"} <= set(numbers) else "")
    return CpuInfo(model, tuple(f for f in REPORTED_FLAGS if f in flags), family)
