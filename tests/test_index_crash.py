"""Crash safety: a write that fails at any step (write, fsync, rename) leaves memory and disk as they were and
the next write works; SIGKILL during adds, deletes and compaction leaves the old or the new state with every
acknowledged write present."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from engine import LaclipConfig
from engine.index import COMMIT, CompactionPolicy, Index, IndexManifest

D, K = 8, 2


def _unit(*shape: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _state(index: Index) -> tuple:
    return index.snapshot().generation, index.image_ids, index.text_ids


def _disk(root: Path) -> tuple:
    return (root / COMMIT).read_bytes(), sorted(p.name for p in (root / "segments").iterdir()), \
        sorted(p.name for p in (root / "deletes").iterdir())


def _count_calls(monkeypatch, name: str, write) -> int:
    """How many times `write` calls os.<name> (the steps a failure can be injected at)."""
    calls = []
    real = getattr(os, name)
    monkeypatch.setattr(os, name, lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    write()
    monkeypatch.undo()
    return len(calls)


WRITES = {
    "add": lambda index, i: index.add_images([f"new{i}"], _unit(1, D, seed=i), _unit(1, K, D, seed=i),
                                             [{"i": i}], None),
    "delete": lambda index, i: index.delete_images([f"old{i}"]),
    "compact": lambda index, i: index.compact(),
}


@pytest.mark.parametrize("what", list(WRITES))
@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_a_failure_at_every_step_changes_nothing(tmp_path, monkeypatch, what, step):
    def fresh(root: Path) -> Index:
        index = Index.create(root, IndexManifest("tiny", "abc", D, LaclipConfig(num_crops=K)),
                             policy=CompactionPolicy(max_small=100, max_deleted_fraction=1.0))
        for i in range(3):
            index.add_images([f"old{i}"], _unit(1, D, seed=50 + i), _unit(1, K, D, seed=50 + i))
        index.delete_images(["old2"])
        return index

    write = WRITES[what]
    probe = fresh(tmp_path / "probe")
    steps = _count_calls(monkeypatch, step, lambda: write(probe, 0))
    assert steps >= 1
    for failing in range(steps):
        root = tmp_path / f"{failing}"
        index = fresh(root)
        memory, disk = _state(index), _disk(root)
        real, calls = getattr(os, step), []

        def flaky(*args, **kwargs):
            calls.append(1)
            if len(calls) == failing + 1:
                raise OSError(f"injected {step} failure #{failing}")
            return real(*args, **kwargs)

        monkeypatch.setattr(os, step, flaky)
        with pytest.raises(OSError, match="injected"):
            write(index, 0)
        monkeypatch.undo()
        assert _state(index) == memory, f"memory changed after a failure at {step} #{failing}"
        assert _disk(root) == disk, f"disk changed after a failure at {step} #{failing}"
        assert _state(Index.open(root))[1:] == memory[1:]
        write(index, 1)  # the next write works
        assert _state(Index.open(root))[1:] == _state(index)[1:]


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from engine.index import CompactionPolicy, Index
    root, mode = sys.argv[1], sys.argv[2]
    index = Index.open(root, policy=CompactionPolicy(small_rows=50, max_small=4))
    rng = np.random.default_rng(0)
    def unit(n):
        x = rng.standard_normal((n, 8)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    for i in range(100000):
        if mode == "delete":
            index.delete_texts([f"d{i}"])
        else:
            index.add_texts([f"a{i}"], unit(1), [{"i": i}])
            if mode == "compact" and i % 3 == 2:
                index.compact()
        print(i, flush=True)
""")


def _prepared(root: Path, mode: str) -> None:
    index = Index.create(root, IndexManifest("tiny", "abc", D, None))
    if mode == "delete":
        index.add_texts([f"d{i}" for i in range(400)], _unit(400, D))


def _kill_and_check(roots_and_modes: list[tuple[Path, str]], delays: list[float]) -> None:
    procs = []
    for (root, mode), delay in zip(roots_and_modes, delays):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), mode], stdout=subprocess.PIPE,
                                text=True, cwd=Path(__file__).resolve().parents[1])
        procs.append((proc, root, mode, delay))
    for proc, root, mode, delay in procs:
        first = proc.stdout.readline()  # the writer is running (imports done)
        assert first, "the writer process died before its first write"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        acked = 1 + sum(1 for _ in proc.stdout)  # every line it printed was a completed (acknowledged) write
        proc.wait()
        index = Index.open(root)
        if mode == "delete":
            survivors = set(index.text_ids)
            assert not survivors & {f"d{i}" for i in range(acked)}  # every acknowledged delete happened
            assert {f"d{i}" for i in range(acked + 1, 400)} <= survivors  # nothing beyond the in-flight one
        else:
            ids = index.text_ids
            assert ids[:acked] == [f"a{i}" for i in range(acked)] and len(ids) in (acked, acked + 1)
            assert index.payload("texts", f"a{acked - 1}") == {"i": acked - 1}
        index.add_texts(["after"], _unit(1, D))  # and the index takes writes again


def test_sigkill_during_add_delete_and_compaction(tmp_path):
    cases = [(tmp_path / mode, mode) for mode in ("add", "delete", "compact")]
    for root, mode in cases:
        _prepared(root, mode)
    _kill_and_check(cases, [0.3, 0.2, 0.5])


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.13, 0.4, 1.1, 2.3])
def test_sigkill_at_varied_moments(tmp_path, delay):
    cases = [(tmp_path / mode, mode) for mode in ("add", "delete", "compact")]
    for root, mode in cases:
        _prepared(root, mode)
    _kill_and_check(cases, [delay] * 3)
