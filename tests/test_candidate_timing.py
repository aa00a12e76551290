"""engine.backends.candidate_timing: rotating rounds give every candidate each position, a turn keeps its fastest
call, and the pool times each tower's candidates together, flushing early when memory runs low."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import InputError
from engine.backends.auto_precision import TowerCandidate
from engine.backends.candidate_timing import TimingPool, memory_low, rotating_samples, time_samples


def test_rounds_rotate_the_order_and_time_each_call_once():
    order = []
    ticks = iter(range(1000))
    calls = {name: (lambda n=name: order.append(n)) for name in "abc"}
    samples = rotating_samples(calls, rounds=4, burst=1, clock=lambda: float(next(ticks)))
    assert order[:3] == ["a", "b", "c"]  # the warm-up, untimed
    assert order[3:] == list("abc" "bca" "cab" "abc")
    assert {name: len(s) for name, s in samples.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(s == 1.0 for values in samples.values() for s in values)
    for rounds, burst in ((0, 1), (1, 0)):
        with pytest.raises(InputError, match="must be >= 1"):
            rotating_samples(calls, rounds=rounds, burst=burst)


def test_a_turn_records_its_fastest_call():
    """The first call of a turn is slow (its pool waking up): the turn's sample is the fastest of its burst."""
    now = [0.0]
    costs = iter([0.0, 5.0, 1.0, 1.0, 5.0, 2.0, 1.5])

    def call():
        now[0] += next(costs)

    assert rotating_samples({"a": call}, rounds=2, burst=3, clock=lambda: now[0]) == {"a": [1.0, 1.5]}


def test_time_samples_uses_the_clock_it_is_given():
    ticks = iter([0.0, 1.0, 1.0, 3.0, 3.0, 3.5])
    calls = []
    samples = time_samples(lambda: calls.append(1), repeats=3, warmup=2, clock=lambda: next(ticks))
    assert samples == [1.0, 2.0, 0.5] and len(calls) == 5
    with pytest.raises(InputError):
        time_samples(lambda: None, repeats=0)


def test_memory_low_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree: 1 kB\nMemAvailable:    8000000 kB\n")
    assert not memory_low(meminfo)
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    1000000 kB\n")  # under 2 GiB
    assert memory_low(meminfo)
    meminfo.write_text("MemTotal:       100000000 kB\nMemAvailable:    15000000 kB\n")  # under 20%
    assert memory_low(meminfo)
    assert not memory_low(tmp_path / "absent")  # nothing to go by
    meminfo.write_text("garbage")
    assert not memory_low(meminfo)


class Counting:
    """An encoder whose calls are counted per tower (the pool must call each tower's workload only)."""

    def __init__(self):
        self.calls = {"vision": 0, "text": 0}

    def encode_images(self, pixels):
        self.calls["vision"] += 1
        return np.zeros((len(pixels), 4), np.float32)

    def encode_texts(self, ids):
        self.calls["text"] += 1
        return np.zeros((len(ids), 4), np.float32)


def _cands(name, towers=("vision", "text")):
    return {t: TowerCandidate(name, "test", "fp32") for t in towers}


def test_the_pool_times_each_towers_candidates_together():
    seen = []

    def sampler(tower, calls):
        seen.append((tower, sorted(calls)))
        for fn in calls.values():
            fn()
        return {name: [float(len(name))] for name in calls}

    pool = TimingPool(torch.zeros(2, 3, 8, 8), torch.ones(1, 4, dtype=torch.long), sampler=sampler,
                      low_memory=lambda: False)
    a, b, c = _cands("a"), _cands("bb"), _cands("ccc", ("text",))
    encoders = [Counting(), Counting(), Counting()]
    for cands, encoder in zip((a, b, c), encoders):
        pool.add(cands, encoder)
    assert not seen  # nothing is timed before the flush
    pool.flush()
    assert seen == [("vision", ["a", "bb"]), ("text", ["a", "bb", "ccc"])]
    assert a["vision"].samples == [1.0] and b["text"].samples == [2.0] and c["text"].samples == [3.0]
    assert encoders[2].calls == {"vision": 0, "text": 1}
    pool.flush()  # empty: nothing happens
    assert len(seen) == 2


def test_the_pool_flushes_early_when_memory_runs_low():
    flushed = []
    low = iter([False, True, False])
    pool = TimingPool(torch.zeros(1, 3, 8, 8), torch.ones(1, 4, dtype=torch.long), low_memory=lambda: next(low),
                      sampler=lambda tower, calls: flushed.append((tower, sorted(calls))) or
                      {name: [1.0] for name in calls})
    for name in ("a", "b", "c"):
        pool.add(_cands(name, ("text",)), Counting())
    assert flushed == [("text", ["a", "b"])]  # the second add found memory low
    pool.flush()
    assert flushed == [("text", ["a", "b"]), ("text", ["c"])]


def test_two_candidates_with_one_name_are_refused():
    pool = TimingPool(torch.zeros(1, 3, 8, 8), torch.ones(1, 4, dtype=torch.long), low_memory=lambda: False)
    pool.add(_cands("a", ("text",)), Counting())
    pool.add(_cands("a", ("text",)), Counting())
    with pytest.raises(InputError, match="share a name"):
        pool.flush()
