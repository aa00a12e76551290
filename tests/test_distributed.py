"""Indexing a collection with engine.distributed: single process vs Ray Data (2 local workers), bad images
from every source kind, resuming, and a killed encode worker. One local Ray for the module (its start-up is
the slow part), with small memory settings: the machine is shared."""
from __future__ import annotations

import base64
import dataclasses
import os
import signal
import sys
import tarfile
import time
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import image_bytes, make_image
from engine import LaclipConfig, Retriever
from engine.cli import main as cli_main
from engine.errors import EngineError, InputError
from engine.records import DatasetError
from engine.distributed import IndexJob, IndexingStalled, RayOptions, index_collection
from engine.distributed.runners import check_local_fit, run_ray
from engine.distributed.stages import EncodeStage, EncoderSpec, PrepareStage, WriteStage
from engine.distributed.watchdog import blame, plan_resources
from engine.sources import list_collection
from engine.index import Index

LACLIP = LaclipConfig(num_crops=2)
GOOD_FOLDER = ["0", "1", "2", "deep/3", "deep/4", "deep/er/5"]
GOOD = GOOD_FOLDER + ["t/6", "t/7", "8"]
BAD = {  # where each bad image is reported, and a phrase of its message
    "corrupt.jpg": "not a readable image", "truncated.jpg": "runcated",
    "bomb.png": "decompression bomb", "gone.png": "no such file",
    "shard.tar:t/bad.jpg": "not a readable image", "valid_imgs.tsv:2": "base64"}


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Four sources: a nested folder, a list file, a WebDataset shard and a cn_clip TSV, each with bad images."""
    root = tmp_path_factory.mktemp("collection")
    folder = root / "folder"
    for i, name in enumerate(GOOD_FOLDER):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        make_image(50 + 13 * i, 40 + 7 * i, seed=i).save(folder / f"{name}.{'png' if i % 2 else 'jpg'}")
    (folder / "corrupt.jpg").write_bytes(os.urandom(300))
    (folder / "truncated.jpg").write_bytes(image_bytes(make_image(80, 60, seed=9), "JPEG")[:400])
    Image.new("1", (9000, 8000)).save(folder / "bomb.png")  # 72M pixels: over the engine's bomb limit
    (root / "list.txt").write_text("missing/gone.png\n")
    with tarfile.open(root / "shard.tar", "w") as tar:
        for name, data in [("t/6.jpg", image_bytes(make_image(70, 50, seed=6), "JPEG")), ("t/6.txt", "猫".encode()),
                           ("t/7.png", image_bytes(make_image(30, 90, seed=7))), ("t/bad.jpg", b"\xff\xd8 nope")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, __import__("io").BytesIO(data))
    good_row = base64.b64encode(image_bytes(make_image(64, 64, seed=8))).decode()
    (root / "valid_imgs.tsv").write_text(f"8\t{good_row}\n9\tnot*base64\n")
    return [str(folder), str(root / "list.txt"), str(root / "shard.tar"), str(root / "valid_imgs.tsv")]


def job(collection: list[str], out: Path, checkpoint: Path, **options) -> IndexJob:
    settings = dict(model="tiny", checkpoint=str(checkpoint), laclip=LACLIP, batch_size=3, segment_rows=4,
                    skip_bad=True, progress=False)
    return IndexJob(collection, str(out), **{**settings, **options})


def contents(directory: Path) -> dict[str, tuple]:
    index = Index.open(directory)
    rows = {}
    for item in index.image_ids:
        global_, crops = index.vector("images", item)
        rows[str(item)] = (global_, crops, index.payload("images", item), index.thumbnail(item))
    return rows


def assert_same_index(got: Path, want: Path) -> None:
    a, b = contents(got), contents(want)
    assert sorted(a) == sorted(b)
    for item in a:
        np.testing.assert_allclose(a[item][0], b[item][0], atol=1e-5, err_msg=item)
        np.testing.assert_allclose(a[item][1], b[item][1], atol=1e-5, err_msg=item)
        assert a[item][2:] == b[item][2:], item


def bad_sources(problems) -> dict[str, str]:
    return {next(where for where in BAD if where in str(p)): str(p) for p in problems}


@pytest.fixture(scope="module")
def reference(collection: list[str], tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The single-process run, skipping bad images."""
    out = tmp_path_factory.mktemp("reference") / "index"
    return out, index_collection(job(collection, out, tiny_checkpoint))


def test_single_process_reports_every_bad_image_with_its_source(reference: tuple) -> None:
    out, report = reference
    assert sorted(contents(out)) == sorted(GOOD)
    assert report.images_added == len(GOOD) and report.images_already_indexed == 0
    found = bad_sources(report.problems)
    assert sorted(found) == sorted(BAD)
    for where, phrase in BAD.items():
        assert phrase in found[where], found[where]


def test_single_process_equals_the_retrievers_own_add_images(reference: tuple, collection: list[str],
                                                             tiny_checkpoint: Path) -> None:
    folder = Path(collection[0])
    paths = [next(folder.glob(f"{name}.*")) for name in GOOD_FOLDER]
    retriever = Retriever.from_checkpoint(tiny_checkpoint, model="tiny", laclip=LACLIP)
    retriever.add_images(paths, ids=GOOD_FOLDER)
    rows = contents(reference[0])
    for item in GOOD_FOLDER:
        global_, crops = retriever.index.vector("images", item)
        np.testing.assert_allclose(rows[item][0], global_, atol=1e-5)
        np.testing.assert_allclose(rows[item][1], crops, atol=1e-5)
        assert rows[item][3] == retriever.thumbnail(item)
    assert rows["deep/er/5"][2] == {"source": "deep/er/5.png"}
    assert rows["t/6"][2] == {"caption": "猫", "source": "shard.tar:t/6.jpg"}
    assert rows["8"][2] == {"source": "valid_imgs.tsv:1"}


def test_a_bad_image_fails_the_job_and_publishes_nothing(collection: list[str], tiny_checkpoint: Path,
                                                         tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="rerun with --skip-bad") as caught:
        index_collection(job(collection, tmp_path / "index", tiny_checkpoint, skip_bad=False, batch_size=64,
                             segment_rows=64))
    assert sorted(bad_sources(caught.value.problems)) == sorted(BAD)
    assert Index.open(tmp_path / "index").image_ids == []


def test_rerun_skips_what_the_index_holds(collection: list[str], tiny_checkpoint: Path, reference: tuple,
                                          tmp_path: Path) -> None:
    out = tmp_path / "index"
    first = index_collection(job(collection[:1], out, tiny_checkpoint))
    assert first.images_added == len(GOOD_FOLDER)
    again = index_collection(job(collection, out, tiny_checkpoint))
    assert (again.images_added, again.images_already_indexed) == (len(GOOD) - len(GOOD_FOLDER), len(GOOD_FOLDER))
    assert_same_index(out, reference[0])
    with pytest.raises(EngineError, match="crops"):
        index_collection(job(collection, out, tiny_checkpoint, laclip=None))


def test_missing_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch, collection: list[str], tmp_path: Path,
                                     tiny_checkpoint: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(EngineError, match=r'pip install --no-build-isolation -e "\.\[distributed\]"'):
        index_collection(job(collection, tmp_path / "index", tiny_checkpoint, ray=RayOptions()))


# ---- on Ray ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, object_store_memory=200 * 1024 ** 2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


TWO_WORKERS = RayOptions(workers=2, cpus_per_worker=0.5, cpus_per_task=0.5)


def test_ray_with_two_workers_equals_the_single_process_run(ray_session, collection: list[str],
                                                            tiny_checkpoint: Path, reference: tuple,
                                                            tmp_path: Path) -> None:
    seen: list[int] = []
    report = index_collection(job(collection, tmp_path / "index", tiny_checkpoint, ray=TWO_WORKERS),
                              on_progress=seen.append)
    assert_same_index(tmp_path / "index", reference[0])
    where = sorted((p.file, p.line, p.kind) for p in report.problems)
    assert where == sorted((p.file, p.line, p.kind) for p in reference[1].problems)
    assert seen == sorted(seen) and seen[-1] == len(GOOD) + len(BAD)


def _encode_workers() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"EncodeStage" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_a_killed_worker_is_retried_and_the_resumed_index_equals_the_reference(
        ray_session, collection: list[str], tiny_checkpoint: Path, reference: tuple, tmp_path: Path) -> None:
    out = tmp_path / "index"
    index_collection(job(collection[2:3], out, tiny_checkpoint))  # part of the collection, as if interrupted
    killed: list[int] = []

    def kill_one_worker(done: int) -> None:
        if not killed and (pids := _encode_workers()):
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    report = index_collection(job(collection, out, tiny_checkpoint, ray=TWO_WORKERS, batch_size=1, segment_rows=1),
                              on_progress=kill_one_worker)
    assert killed, "no encode worker process was found to kill"
    assert report.images_already_indexed == 2
    assert_same_index(out, reference[0])


def test_job_settings_are_checked() -> None:
    with pytest.raises(EngineError, match="batch_size must be >= 1"):
        IndexJob(["x"], "out", batch_size=0)
    with pytest.raises(EngineError, match="workers must be >= 1"):
        IndexJob(["x"], "out", ray=dataclasses.replace(TWO_WORKERS, workers=0))


# ---- never hangs: sizing on the cluster's CPUs, and the stall watchdog ------------------------------------------

def test_resources_are_sized_so_a_task_always_fits_beside_the_workers() -> None:
    two = plan_resources(2, {"CPU": 2.0})  # the case: --workers 2 on 2 CPUs
    assert (two.cpus_per_worker, two.cpus_per_task) == (0.5, 1.0)
    assert plan_resources(1, {"CPU": 2.0}).cpus_per_worker == 1.0
    three = plan_resources(3, {"CPU": 2.0})
    assert 3 * three.cpus_per_worker + three.cpus_per_task <= 2.0
    one_cpu = plan_resources(2, {"CPU": 1.0})
    assert (one_cpu.cpus_per_worker, one_cpu.cpus_per_task) == (0.25, 0.5)
    assert plan_resources(8, {"CPU": 64.0}).cpus_per_worker == 1.0
    gpus = plan_resources(4, {"CPU": 8.0, "GPU": 4.0})
    assert (gpus.gpus_per_worker, gpus.cpus_per_worker) == (1.0, 1.0)
    with pytest.raises(InputError, match=r"4 encode workers x 1 GPU need 4 GPUs but the Ray cluster has 2.*"
                                         r"--workers 2, or --gpus-per-worker 0\.5"):
        plan_resources(4, {"CPU": 8.0, "GPU": 2.0})
    with pytest.raises(InputError, match=r"--cpus-per-task 3 does not fit the Ray cluster's 2 CPUs"):
        plan_resources(1, {"CPU": 2.0}, cpus_per_task=3.0)


def test_a_local_ray_that_cannot_fit_is_refused_before_it_starts(tmp_path: Path, collection: list[str],
                                                                 tiny_checkpoint: Path) -> None:
    not_started = types.SimpleNamespace(is_initialized=lambda: False)
    check_local_fit(not_started, RayOptions(workers=2, init={"num_cpus": 2}))  # sized to fit: no error
    with pytest.raises(InputError, match=r"2 encode workers x 1 CPU = 2 CPUs"):
        check_local_fit(not_started, RayOptions(workers=2, cpus_per_worker=1.0, init={"num_cpus": 2}))
    pytest.importorskip("ray.data")
    if not __import__("ray").is_initialized():  # through the job: refused before the index folder is made
        with pytest.raises(InputError, match=r"2 encode workers x 1 CPU"):
            index_collection(job(collection, tmp_path / "index", tiny_checkpoint,
                                 ray=RayOptions(workers=2, cpus_per_worker=1.0, init={"num_cpus": 2})))
        assert not (tmp_path / "index").exists()


def test_the_stalled_stage_is_the_longest_running_or_the_one_whose_input_waits() -> None:
    def state(rows, running=None):
        return {"rows": dict(zip(("prepare", "encode", "write"), rows)),
                "running": {"prepare": [], "encode": [], "write": [], **(running or {})}}
    assert blame(state((10, 3, 0), {"encode": [40.0, 12.0], "prepare": [5.0]}), 20, 8)[0] == "encode"
    assert blame(state((0, 0, 0)), 20, 8)[0] == "prepare"
    assert blame(state((6, 3, 0)), 20, 8)[0] == "encode"
    assert blame(state((20, 20, 16)), 20, 8)[0] == "write"
    assert blame(None, 20, 8)[0] == "unknown"


def test_workers_holding_every_cpu_are_refused_naming_the_numbers(ray_session, collection: list[str],
                                                                 tiny_checkpoint: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    options = RayOptions(workers=2, cpus_per_worker=1.0)
    with pytest.raises(InputError, match=r"2 encode workers x 1 CPU = 2 CPUs, plus 1 CPU for a prepare/write task, "
                                         r"is more than the Ray cluster's 2 CPUs.*--cpus-per-worker 0\.5, or "
                                         r"--workers 1"):
        index_collection(job(collection, tmp_path / "index", tiny_checkpoint, ray=options))
    status = cli_main(["index", "--model", "tiny", "--checkpoint", str(tiny_checkpoint), "--images", collection[0],
                       "--out", str(tmp_path / "cli"), "--skip-bad", "--quiet", "--ray", "--workers", "2",
                       "--cpus-per-worker", "1"])
    assert status == 2
    assert "Leave --cpus-per-worker out" in capsys.readouterr().err


def test_ray_with_as_many_workers_as_cpus_finishes_and_equals_the_single_process_run(
        ray_session, collection: list[str], tiny_checkpoint: Path, reference: tuple, tmp_path: Path) -> None:
    assert ray_session.cluster_resources()["CPU"] == 2
    started = time.monotonic()
    report = index_collection(job(collection, tmp_path / "index", tiny_checkpoint,
                                  ray=RayOptions(workers=2, stall_timeout_s=60)))  # the CLI's defaults otherwise
    assert time.monotonic() - started < 60
    assert report.images_added == len(GOOD)
    assert_same_index(tmp_path / "index", reference[0])


def _cpus_come_back(ray, within_s: float = 20.0) -> bool:
    """The stopped job's tasks and actors gave their CPUs back."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= 2:
            return True
        time.sleep(0.5)
    return False


def test_the_watchdog_stops_a_job_stuck_in_prepare_naming_the_stage(ray_session, collection: list[str],
                                                                    tiny_checkpoint: Path, tmp_path: Path) -> None:
    class StuckPrepare(PrepareStage):  # defined here, so Ray pickles it by value to the workers
        def _prepare(self, batch):
            time.sleep(300)
            return super()._prepare(batch)

    refs = list_collection(collection[:1]).images[:3]
    spec = EncoderSpec("tiny", str(tiny_checkpoint), batch_size=3)
    started = time.monotonic()
    with pytest.raises(IndexingStalled, match=r"indexing stalled in the prepare stage: no batch finished for \d+ s "
                                              r"\(--stall-timeout-s 6\); .*prepare 0/3, encode 0/3, write 0/3 "
                                              r"images.*a rerun resumes") as caught:
        list(run_ray(spec, refs, str(tmp_path / "index"), options=RayOptions(workers=2, stall_timeout_s=6),
                     segment_rows=3, stages=(StuckPrepare, EncodeStage, WriteStage)))
    assert caught.value.stage == "prepare"
    assert time.monotonic() - started < 30
    assert _cpus_come_back(ray_session)


def test_the_watchdog_stops_a_job_stuck_in_encode_naming_the_stage(ray_session, collection: list[str],
                                                                   tiny_checkpoint: Path, tmp_path: Path) -> None:
    class StuckEncode(EncodeStage):
        def _encode(self, batch):
            time.sleep(300)
            return super()._encode(batch)

    refs = list_collection(collection[:1]).images[:3]
    spec = EncoderSpec("tiny", str(tiny_checkpoint), batch_size=3)
    started = time.monotonic()
    # the clock restarts when prepare finishes; the encode worker may still be starting when it fires (a cold
    # worker imports torch for many seconds on 2 busy cores), so the reason is not asserted, the stage is
    with pytest.raises(IndexingStalled, match=r"stalled in the encode stage.*prepare 3/3, encode 0/3, write 0/3 "
                                              r"images") as caught:
        list(run_ray(spec, refs, str(tmp_path / "index"), options=RayOptions(workers=1, stall_timeout_s=15),
                     segment_rows=3, stages=(PrepareStage, StuckEncode, WriteStage)))
    assert caught.value.stage == "encode"
    assert time.monotonic() - started < 60
    assert _cpus_come_back(ray_session)


def test_the_cli_passes_the_stall_timeout_and_reports_a_stall(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                              collection: list[str], tiny_checkpoint: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    seen = {}

    def stalled(job, **_):
        seen["options"] = job.ray
        raise IndexingStalled("indexing stalled in the encode stage: ...", "encode", 7.0)

    monkeypatch.setattr("engine.distributed.index_collection", stalled)
    status = cli_main(["index", "--model", "tiny", "--checkpoint", str(tiny_checkpoint), "--images", collection[0],
                       "--out", str(tmp_path / "cli"), "--ray", "--workers", "2", "--stall-timeout-s", "7"])
    assert status == 2 and "error: indexing stalled in the encode stage" in capsys.readouterr().err
    options = seen["options"]
    assert (options.workers, options.stall_timeout_s, options.cpus_per_worker, options.cpus_per_task) == (2, 7.0,
                                                                                                          None, None)


# ---- resumable bulk indexing: publish every N images ----------------------------------------------------------

def test_publishes_every_n_images_and_a_settings_check(collection: list[str], tiny_checkpoint: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []  # images in the index after each publish
    real = Index.publish

    def counting(self: Index, refs: list) -> None:
        real(self, refs)
        sizes.append(len(self.image_ids))

    monkeypatch.setattr(Index, "publish", counting)
    report = index_collection(job(collection, tmp_path / "index", tiny_checkpoint, publish_every=2, segment_rows=64,
                                  batch_size=1, commit_seconds=3600.0))
    assert report.images_added == len(GOOD)
    # segments are cut at publish_every rows (not segment_rows=64); a publish waits for 2 good rows (a segment
    # whose batch held a bad image has 1, so a publish holds 2 or 3), except the last one
    steps = np.diff([0] + sizes)
    assert sizes[-1] == len(GOOD) and len(sizes) >= len(GOOD) // 3
    assert all(2 <= step <= 3 for step in steps[:-1]) and 1 <= steps[-1] <= 3, sizes
    with pytest.raises(EngineError, match="publish_every must be >= 1"):
        IndexJob(["x"], "out", publish_every=0)
    with pytest.raises(EngineError, match="commit_seconds must be > 0"):
        IndexJob(["x"], "out", commit_seconds=0)


def test_a_killed_cli_run_keeps_what_it_published_and_the_rerun_skips_it(tiny_checkpoint: Path,
                                                                         tmp_path: Path) -> None:
    import subprocess

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(60):
        make_image(40 + i % 7, 30 + i % 5, seed=100 + i).save(folder / f"{i:02d}.png")
    out = tmp_path / "index"
    command = [sys.executable, "-m", "engine", "index", "--model", "tiny", "--checkpoint", str(tiny_checkpoint),
               "--images", str(folder), "--out", str(out), "--batch-size", "2", "--publish-every", "4", "--quiet"]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and run.poll() is None:
            if (out / "index.json").exists():
                try:
                    if len(Index.open(out).image_ids) >= 8:
                        break
                except EngineError:
                    pass
            time.sleep(0.05)
        assert run.poll() is None, f"the run ended before it could be killed: {run.stderr.read().decode()[-500:]}"
        run.send_signal(signal.SIGKILL)
    finally:
        run.wait()
    kept = sorted(map(str, Index.open(out).image_ids))
    assert 8 <= len(kept) < 60 and len(kept) % 4 == 0, len(kept)  # whole published batches, nothing half-written
    result = cli_main(command[3:])
    assert result == 0
    final = Index.open(out)
    assert sorted(map(str, final.image_ids)) == [f"{i:02d}" for i in range(60)]
    assert set(kept) <= set(map(str, final.image_ids))
    assert not list(out.rglob(".tmp-*"))
