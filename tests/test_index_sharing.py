"""One index folder shared by several writers and readers (engine.index.core/commit): readers follow commits,
writers rebase onto another process's commit, real conflicts are IdConflictError (409), the writer lock times out
with IndexBusyError (503) naming its holder, and a killed holder's lock is released. Two Index objects on one
folder lock each other out like two processes (flock is per open file); one test uses a real second process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import numpy as np
import pytest

from engine.errors import IdConflictError, IndexBusyError
from engine.index import Index, IndexManifest
from engine.index.commit import file_lock
from engine.index.manifest import AnnConfig
from engine.laclip import LaclipConfig
from engine.serve.errors import status_of

D, K = 16, 2


def _unit(*shape: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _create(root) -> Index:
    manifest = IndexManifest("synthetic", "sharing-test", D, LaclipConfig(num_crops=K), ann=AnnConfig(kind="none"))
    index = Index.create(root, manifest)
    index.add_images(["a", "b"], _unit(2, D, seed=1), _unit(2, K, D, seed=2))
    return index


def _add(index: Index, ids: list, seed: int) -> list:
    return index.add_images(ids, _unit(len(ids), D, seed=seed), _unit(len(ids), K, D, seed=seed + 1))


def test_a_reader_follows_another_writers_commits(tmp_path):
    writer = _create(tmp_path / "idx")
    reader = Index.open(tmp_path / "idx", refresh_interval_s=0.05)
    assert reader.image_ids == ["a", "b"]
    _add(writer, ["c"], seed=3)
    writer.delete_images(["a"])
    time.sleep(0.06)
    assert reader.image_ids == ["b", "c"]
    found = reader.search_images(writer.array("image_global")[1:2], 1, score=None, exact=True)[0]
    assert reader.snapshot().part_at("images", int(found.positions[0])).id_at(int(found.rows[0])) == "c"
    manual = Index.open(tmp_path / "idx", refresh_interval_s=None)  # follows on refresh() only
    _add(writer, ["d"], seed=4)
    assert "d" not in manual.image_ids
    assert manual.refresh() and manual.image_ids == ["b", "c", "d"] and not manual.refresh()


def test_settings_changed_in_memory_survive_following_a_commit(tmp_path):
    writer = _create(tmp_path / "idx")
    reader = Index.open(tmp_path / "idx", refresh_interval_s=None)
    reader.manifest = reader.manifest.with_laclip(replace(reader.manifest.laclip, tau=0.2))
    wanted = reader.manifest
    assert wanted.laclip.tau == 0.2
    _add(writer, ["c"], seed=3)
    assert reader.refresh() and reader.manifest == wanted


def test_a_stale_writer_rebases_instead_of_failing(tmp_path):
    one = _create(tmp_path / "idx")
    two = Index.open(tmp_path / "idx", refresh_interval_s=None)  # never follows on its own: stale after `one`
    _add(one, ["c"], seed=3)
    _add(two, ["d"], seed=5)  # used to fail: "changed by another process (commit 3, this process has 2)"
    two.delete_images(["c"])
    fresh = Index.open(tmp_path / "idx")
    assert fresh.image_ids == ["a", "b", "d"]
    fresh.verify()


def test_real_conflicts_name_the_id_and_change_nothing(tmp_path):
    one = _create(tmp_path / "idx")
    two = Index.open(tmp_path / "idx", refresh_interval_s=None)
    _add(one, ["x"], seed=3)
    with pytest.raises(IdConflictError, match="'x'") as added:
        _add(two, ["y", "x"], seed=5)
    assert status_of(added.value)[0] == 409
    one.delete_images(["b"])
    with pytest.raises(IdConflictError, match="'b'") as deleted:
        two.delete_images(["a", "b"])
    assert status_of(deleted.value)[0] == 409
    assert Index.open(tmp_path / "idx").image_ids == ["a", "x"]  # neither failed write changed anything


def test_a_held_writer_lock_times_out_naming_its_holder(tmp_path):
    _create(tmp_path / "idx")
    waiting = Index.open(tmp_path / "idx", lock_timeout_s=0.2)
    with file_lock(tmp_path / "idx"):
        started = time.monotonic()
        with pytest.raises(IndexBusyError, match=f"pid {os.getpid()}") as busy:
            _add(waiting, ["c"], seed=3)
        assert 0.2 <= time.monotonic() - started < 2
    assert status_of(busy.value) == (503, {"Retry-After": "1"})
    assert _add(waiting, ["c"], seed=3) == ["c"]  # free again


def test_a_killed_holders_lock_is_released_and_its_commit_followed(tmp_path):
    """A second process commits, then dies holding the writer lock (SIGKILL): this process sees its rows within
    2 s and writes after it (flock locks die with their process)."""
    index = _create(tmp_path / "idx")
    index.refresh_interval_s = 0.5
    child = textwrap.dedent(f"""
        import numpy as np, time, sys
        from engine.index import Index
        from engine.index.commit import file_lock
        idx = Index.open({str(tmp_path / "idx")!r})
        x = np.eye(1, {D}, dtype=np.float32); c = np.repeat(x[:, None], {K}, axis=1)
        idx.add_images(["from-child"], x, c)
        with file_lock(idx.directory):
            print("holding", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "holding"
        committed = time.monotonic()
        while "from-child" not in index.image_ids:
            assert time.monotonic() - committed < 2, "the other process's commit was not seen within 2 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        index.lock_timeout_s = 5
        assert _add(index, ["after"], seed=9) == ["after"]
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert Index.open(tmp_path / "idx").image_ids == ["a", "b", "from-child", "after"]


def test_a_dead_writers_temporaries_are_swept_at_open_and_at_each_commit(tmp_path):
    """Temporaries of a process of this host that no longer runs go at once; a live writer's stay; older
    releases' (no pid) go after an hour."""
    import socket

    index = _create(tmp_path / "idx")
    host = socket.gethostname().replace("-", "_")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    segments = tmp_path / "idx" / "segments"
    leftovers = {
        "dead": segments / f".tmp-{dead_pid}@{host}-abc.seg",
        "dead-commit": tmp_path / "idx" / f".tmp-{dead_pid}@{host}-index.json",
        "live": segments / f".tmp-{os.getpid()}@{host}-def.seg",
        "old": segments / ".tmp-0123abcd.seg",
        "old-young": segments / ".tmp-4567efab.seg",
    }
    for path in leftovers.values():
        path.write_bytes(b"partial")
    os.utime(leftovers["old"], (time.time() - 7200, time.time() - 7200))
    Index.open(tmp_path / "idx")
    assert not leftovers["dead"].exists() and not leftovers["dead-commit"].exists() and not leftovers["old"].exists()
    assert leftovers["live"].exists() and leftovers["old-young"].exists()
    again = segments / f".tmp-{dead_pid}@{host}-ghi.seg"
    again.write_bytes(b"partial")
    _add(index, ["c"], seed=3)  # the next commit sweeps too
    assert not again.exists() and leftovers["live"].exists()
    assert Index.open(tmp_path / "idx").image_ids == ["a", "b", "c"]
