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
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import image_bytes, make_image
from engine import LaclipConfig, Retriever
from engine.errors import EngineError
from engine.records import DatasetError
from engine.distributed import IndexJob, RayOptions, index_collection
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
    with pytest.raises(EngineError, match=r'pip install -e "\.\[distributed\]"'):
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
