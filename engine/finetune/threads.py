"""How many torch threads CPU fine-tuning uses by default: the cores other work leaves free, less one spare, at most
MAX_THREADS. A thread the OS deschedules stalls every parallel region of a step, so on a busy machine more threads
than free cores collapses throughput (measured on 2 cores beside a compile: 4.3 pairs/s with 2 threads, 20.2 with 1).
"""
from __future__ import annotations

import os

MAX_THREADS = 4  # a CPU step of the models here gains little beyond this; more only adds waiting


def machine_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def machine_load() -> float:
    """Runnable processes on the machine, averaged over the last minute (0 where the OS does not say)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not Unix
        return 0.0


def default_threads(cores: int, load: float, ranks: int = 1) -> int:
    """Torch threads for each of `ranks` training processes on `cores` cores with `load` runnable processes:
    the free cores (cores - load) less one kept spare for decoding and everything else, shared by the ranks,
    between 1 and MAX_THREADS."""
    free = int(cores - load + 0.5)
    usable = min(cores - 1, free)
    return max(1, min(MAX_THREADS, usable // max(1, ranks)))
