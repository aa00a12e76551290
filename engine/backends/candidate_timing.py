"""How `--precision auto` times its candidates: together, in rotating rounds, so that a slow stretch of a shared
machine falls on every candidate alike instead of on whichever was being timed then.

On the 2-core Xeon VM the same encoder took 285 ms and then 549 ms for 8 images in consecutive loops; timed one
after another (5 calls each), auto once chose torch bf16 autocast for images (3.4x the fp32 reference when timed
in rotation) over bf16-compiled (6.1x). `TimingPool` collects gated candidates and times each tower's calls in
`rotating_samples`: every round gives every candidate one turn, the order rotating, and a turn keeps the fastest
of its calls (the first call after another runtime's turn pays for waking its thread pool, which a server calling
one tower back to back never pays). Candidates wait in the pool, encoders alive, until it is flushed; the pool
flushes early when the machine runs low on memory, so a large model is timed in smaller groups, never swapped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import InputError

# (tower, {candidate name: one call of the workload}) -> {candidate name: seconds per round}
Sampler = Callable[[str, dict[str, Callable[[], Any]]], dict[str, list[float]]]
BURST = 2  # calls per turn: the first pays for waking the candidate's thread pool, the second is kept if faster
LOW_MEMORY_FRACTION = 0.2  # flush early below this share of the machine's memory available
LOW_MEMORY_BYTES = 2 << 30  # ... or below 2 GiB

__all__ = ["BURST", "Sampler", "TimingPool", "memory_low", "rotating_samples", "time_samples"]


def time_samples(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1,
                 clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Wall seconds of `repeats` calls of fn() after `warmup` untimed calls."""
    if repeats < 1:
        raise InputError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = clock()
        fn()
        samples.append(clock() - start)
    return samples


def rotating_samples(calls: dict[str, Callable[[], Any]], rounds: int, burst: int = BURST,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per round for each entry: one untimed warm-up call each, then `rounds` rounds giving every entry a
    turn, round r starting at entry r (mod the count) so no entry always follows the same one; a turn is `burst`
    calls and records the fastest."""
    if rounds < 1 or burst < 1:
        raise InputError(f"rounds and burst must be >= 1, got {rounds} and {burst}")
    names = list(calls)
    for name in names:
        calls[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            turn = []
            for _ in range(burst):
                start = clock()
                calls[name]()
                turn.append(clock() - start)
            samples[name].append(min(turn))
    return samples


def memory_low(meminfo: Path = Path("/proc/meminfo")) -> bool:
    """True when the memory available is below LOW_MEMORY_BYTES or LOW_MEMORY_FRACTION of the total (False where
    /proc/meminfo cannot be read: nothing to go by)."""
    try:
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        total, available = (int(fields[key].split()[0]) * 1024 for key in ("MemTotal", "MemAvailable"))
    except (OSError, KeyError, ValueError, IndexError):
        return False
    return available < max(LOW_MEMORY_BYTES, LOW_MEMORY_FRACTION * total)


@dataclass
class _Waiting:
    cands: dict[str, Any]  # tower -> TowerCandidate
    encoder: Any


@dataclass
class TimingPool:
    """Gated candidates waiting to be timed together (see the module docstring). `add` keeps the encoder until
    `flush`, which times each tower's waiting candidates with `sampler` and fills their samples."""

    pixels: torch.Tensor
    queries: torch.Tensor
    repeats: int = 5
    sampler: Sampler | None = None  # tests inject timings; default rotating_samples over `repeats` rounds
    low_memory: Callable[[], bool] = memory_low
    _waiting: list[_Waiting] = field(default_factory=list)

    def add(self, cands: dict[str, Any], encoder: Any) -> None:
        """Queue `encoder`'s candidates (tower -> TowerCandidate); flush first if memory is already low."""
        self._waiting.append(_Waiting(cands, encoder))
        if self.low_memory():
            self.flush()

    def flush(self) -> None:
        """Time every waiting candidate, per tower in rotation, and release the encoders."""
        sampler = self.sampler or (lambda tower, calls: rotating_samples(calls, self.repeats))
        for tower, workload in (("vision", self.pixels), ("text", self.queries)):
            waiting = [(w.cands[tower], w.encoder) for w in self._waiting if tower in w.cands]
            if not waiting:
                continue
            calls = {cand.name: _call(encoder, tower, workload) for cand, encoder in waiting}
            if len(calls) != len(waiting):
                raise InputError(f"two {tower} candidates share a name: {[c.name for c, _ in waiting]}")
            samples = sampler(tower, calls)
            for cand, _ in waiting:
                cand.samples = list(samples[cand.name])
        self._waiting.clear()


def _call(encoder: Any, tower: str, workload: torch.Tensor) -> Callable[[], Any]:
    encode = encoder.encode_images if tower == "vision" else encoder.encode_texts
    return lambda: encode(workload)
