"""Serving on Ray Serve (engine.serve.cluster) on a local Ray with 2 CPUs: 2 shards x 1 replica and 1 shard x
2 replicas answer exactly as the single process does (text->image, image->text, image->image, every LACLIP
mode), follow the writer's commits, and a killed replica yields retried or 503 answers, never partial ones."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_image
from engine import LaclipConfig, Retriever
from engine.errors import EngineError, ShardUnavailableError
from engine.laclip import ScoreConfig
from engine.serve.cluster import Cluster, ClusterOptions

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

MODES = {"plain": ScoreConfig(alpha=1.0), "pooled": ScoreConfig(0.2, 0.5, "image"),
         "query-aware": ScoreConfig(0.1, 0.3, "text")}
QUERIES = ["敦煌壁画里的飞天", "丝绸上的花鸟纹样", "山水", "一只猫"]


@pytest.fixture(scope="module")
def ray_local():
    from ray import serve

    ray.init(num_cpus=2, object_store_memory=200 * 1024 ** 2, include_dashboard=False, log_to_driver=False)
    yield ray
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def index_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-model index with crops, images and texts in several segments, and deletes."""
    root = tmp_path_factory.mktemp("ray") / "idx"
    retriever = Retriever.from_checkpoint(tiny_checkpoint, model="tiny", laclip=LaclipConfig(num_crops=3))
    retriever.save(root)
    for batch in range(6):
        images = [make_image(40 + 7 * i, 30 + 5 * batch, seed=100 * batch + i) for i in range(5 + batch)]
        retriever.add_images(images, [f"b{batch}/{i}" for i in range(len(images))])
        retriever.add_texts([f"{q}{batch}" for q in QUERIES], [f"t{batch}/{i}" for i in range(len(QUERIES))])
    retriever.add_images([make_image(64, 48, seed=3)], ["twin"])  # the same pixels as b0/3: a tie
    retriever.delete_images(["b1/0", "b3/2"])
    retriever.delete_texts(["t2/1"])
    return root


def open_pair(index_dir: Path, tiny_checkpoint: Path, options: ClusterOptions) -> tuple[Retriever, Retriever, Cluster]:
    single = Retriever.load(index_dir, checkpoint=tiny_checkpoint)
    scattered = Retriever.load(index_dir, checkpoint=tiny_checkpoint)
    cluster = Cluster(index_dir, options).start()
    scattered.index.scatter = cluster.scan
    return single, scattered, cluster


def same_hits(got: list, want: list) -> None:
    assert [h.id for h in got] == [h.id for h in want]
    np.testing.assert_allclose([h.score for h in got], [h.score for h in want], rtol=0, atol=1e-6)
    assert [h.payload for h in got] == [h.payload for h in want]


@pytest.mark.parametrize("shards,replicas", [(2, 1), (1, 2)], ids=["2-shards", "2-replicas"])
def test_ray_serve_answers_exactly_as_the_single_process(ray_local, index_dir: Path, tiny_checkpoint: Path,
                                                         shards: int, replicas: int) -> None:
    single, scattered, cluster = open_pair(index_dir, tiny_checkpoint,
                                           ClusterOptions(shards=shards, replicas=replicas, cpus_per_replica=0.5))
    try:
        rows = cluster.shard_rows()
        assert sum(r["images"] for r in rows) == single.index.snapshot().live("images")
        image = make_image(50, 60, seed=7)
        for mode, score in MODES.items():
            for k in (1, 5, 17):
                for got, want in zip(scattered.search_images(QUERIES, k, score=score),
                                     single.search_images(QUERIES, k, score=score)):
                    same_hits(got, want)
                same_hits(scattered.search_texts(image, k, score=score), single.search_texts(image, k, score=score))
        for query in ("b0/3", "b4/1", image):
            same_hits(scattered.search_similar(query, 9), single.search_similar(query, 9))
    finally:
        cluster.close()


def test_shards_follow_the_writers_commits_and_a_killed_replica_never_gives_a_partial_answer(
        ray_local, index_dir: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    from ray import serve

    root = tmp_path / "idx"
    shutil.copytree(index_dir, root)
    single, scattered, cluster = open_pair(root, tiny_checkpoint,
                                           ClusterOptions(shards=2, replicas=1, cpus_per_replica=0.5, timeout_s=5,
                                                          retries=6))
    try:
        scattered.add_images([make_image(33, 77, seed=999)], ["fresh"])  # the ingress is the writer
        assert scattered.search_similar("fresh", 1)[0].id != "fresh"
        assert "fresh" in [h.id for h in scattered.search_images("山水", 40)]
        single.refresh()
        want = single.search_images(QUERIES, 6)
        outcomes: list[str] = []
        stop = threading.Event()

        def search_while_killing() -> None:
            while not stop.is_set():
                try:
                    for got, expected in zip(scattered.search_images(QUERIES, 6), want):
                        same_hits(got, expected)
                    outcomes.append("ok")
                except ShardUnavailableError:
                    outcomes.append("503")
                except AssertionError as exc:  # a partial or wrong answer
                    outcomes.append(f"wrong: {exc}")

        searcher = threading.Thread(target=search_while_killing)
        searcher.start()
        time.sleep(0.5)
        replicas = shard_replicas("shard-1")
        assert replicas, "no replica actor of shard 1 found"
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=False)
        killed_at = len(outcomes)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (len(outcomes) >= killed_at + 3 and outcomes[-1] == "ok"):
            time.sleep(0.2)
        stop.set()
        searcher.join(timeout=120)
        assert not [o for o in outcomes if o.startswith("wrong")], outcomes
        assert len(outcomes) >= killed_at + 3 and outcomes[-1] == "ok", outcomes[-10:]
        status = serve.status().applications[cluster.apps[1]].deployments["shard-1"].status
        assert str(status).endswith("HEALTHY"), status
        assert shard_replicas("shard-1") and shard_replicas("shard-1") != replicas  # Ray Serve started a new one
    finally:
        cluster.close()


def shard_replicas(deployment: str) -> list[dict]:
    return sorted((a for a in ray.util.list_named_actors(all_namespaces=True)
                   if "SERVE_REPLICA" in a["name"] and deployment in a["name"]), key=lambda a: a["name"])


def test_plans_that_cannot_be_placed_are_refused_naming_the_numbers() -> None:
    with pytest.raises(EngineError, match=r"2 shards x 2 replicas x 1 CPUs = 4 CPUs, but the Ray cluster has 2"):
        ClusterOptions(shards=2, replicas=2, cpus_per_replica=1.0).cpus(2.0)
    assert ClusterOptions(shards=2, replicas=2).cpus(2.0) == 0.5
    with pytest.raises(EngineError, match="shards must be an int >= 1"):
        ClusterOptions(shards=0)


def test_the_http_server_on_ray_serve_answers_as_the_single_process(ray_local, index_dir: Path,
                                                                      tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`python -m engine.serve --ray auto --shards 2` (joining this test's Ray): the same HTTP answers."""
    import base64
    import signal

    import httpx

    from conftest import image_bytes
    from engine.serve.launcher import ServerProcess

    single = Retriever.load(index_dir, checkpoint=tiny_checkpoint)
    srv = ServerProcess(["--model", "tiny", "--checkpoint", str(tiny_checkpoint), "--index", str(index_dir),
                         "--read-only", "--ray", "auto", "--shards", "2", "--cpus-per-replica", "0.5"],
                        tmp_path / "server.log", env={"OMP_NUM_THREADS": "1"}, cwd=Path(__file__).resolve().parents[1])
    image = make_image(50, 60, seed=7)
    with srv.serving(stop_signal=signal.SIGTERM), httpx.Client(base_url=srv.url, timeout=60) as client:
        assert [s["images"] for s in client.get("/v1/index/stats").json()["shards"]] != [0, 0]
        for score in MODES.values():
            settings = {"alpha": score.alpha, "tau": score.tau, "weights": score.weights}
            got = client.post("/v1/search/images", json={"query": QUERIES, "k": 7, "laclip": settings}).json()["hits"]
            for hits, want in zip(got, single.search_images(QUERIES, 7, score=score)):
                assert [h["id"] for h in hits] == [h.id for h in want]
                np.testing.assert_allclose([h["score"] for h in hits], [h.score for h in want], atol=1e-5)
        encoded = base64.b64encode(image_bytes(image)).decode()
        texts = client.post("/v1/search/texts", json={"image": encoded, "k": 5}).json()["hits"]
        assert [h["id"] for h in texts] == [h.id for h in single.search_texts(image, 5)]
        similar = client.post("/v1/search/similar", json={"id": "b0/3", "k": 6}).json()["hits"]
        assert [h["id"] for h in similar] == [h.id for h in single.search_similar("b0/3", 6)]
