"""Near-duplicate groups (engine.duplicates): the connected components of every pair at or above the threshold,
as brute force computes them on generated vectors (planted groups, chains, several segments, deletes), by the
exact and the IVF range search; `python -m engine duplicates` as JSON and as a table."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine import LaclipConfig
from engine.cli import main
from engine.duplicates import DuplicatesConfig, components, find_duplicates, groups_json
from engine.errors import InputError
from engine.index import AnnConfig, Index, IndexManifest

D = 32


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def brute_force_groups(vectors: np.ndarray, ids: list, threshold: float) -> list[list]:
    """Components of the pairs with cosine >= threshold, by a plain union-find over the full similarity matrix."""
    sims = vectors.astype(np.float64) @ vectors.T.astype(np.float64)
    parent = list(range(len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in zip(*np.nonzero(np.triu(sims >= threshold, 1))):
        parent[root(a)] = root(b)
    groups: dict[int, list] = {}
    for i in range(len(ids)):
        groups.setdefault(root(i), []).append(i)
    found = [sorted(g) for g in groups.values() if len(g) > 1]
    return [[ids[i] for i in g] for g in sorted(found, key=lambda g: (-len(g), g[0]))]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Three segments of random vectors with planted near-duplicates (groups of 2..5, a chain) and deletes."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("dups") / "idx"
    index = Index.create(root, IndexManifest("tiny", "abc", D, LaclipConfig(num_crops=2),
                                             ann=AnnConfig(kind="none")))
    base = unit(rng.normal(size=(700, D)))
    for size, noise in ((3, 0.01), (2, 0.05), (5, 0.03), (4, 0.01), (2, 0.05), (3, 0.03)):  # near copies of
        source = int(rng.integers(0, 200))  # earlier rows, spread over the later segments
        for _ in range(size - 1):
            row = int(rng.integers(200, 640))
            base[row] = unit(base[source] + rng.normal(scale=noise, size=D))
    step = unit(rng.normal(size=D))
    for i, row in enumerate((650, 651, 652, 653)):  # a chain: neighbours close, the ends further apart
        base[row] = unit(base[640] + 0.28 * (i + 1) * step)
    start = 0
    for size in (199, 301, 200):
        ids = [f"i{n}" for n in range(start, start + size)]
        index.add_images(ids, base[start:start + size], unit(rng.normal(size=(size, 2, D))))
        start += size
    index.delete_images([f"i{n}" for n in range(0, 700, 37)])
    return index


@pytest.mark.parametrize("threshold", [0.9, 0.95, 0.99])
@pytest.mark.parametrize("config", [DuplicatesConfig(), DuplicatesConfig(exact_below=10, nprobe=8, block_rows=97)],
                         ids=["exact", "ivf"])
def test_groups_equal_brute_force(planted, threshold: float, config: DuplicatesConfig) -> None:
    snap = planted.snapshot()
    want = brute_force_groups(planted.array("image_global"), planted.image_ids, threshold)
    assert want, "the planted data must hold groups at this threshold"
    report = groups_json(find_duplicates(snap, threshold, config), snap)
    assert [g["members"] for g in report["groups"]] == want
    assert [g["size"] for g in report["groups"]] == [len(g) for g in want]
    assert report["images"] == snap.live("images") and report["threshold"] == threshold


def test_components_match_a_union_find() -> None:
    rng = np.random.default_rng(1)
    edges = rng.integers(0, 400, size=(300, 2))
    got = [g.tolist() for g in components(edges)]
    vectors = np.zeros((400, 400), np.float32)  # adjacency as "similarity" for the brute-force grouping
    vectors[edges[:, 0], edges[:, 1]] = vectors[edges[:, 1], edges[:, 0]] = 1
    parent = list(range(400))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in edges:
        parent[root(a)] = root(b)
    groups: dict[int, list] = {}
    for i in np.unique(edges):
        groups.setdefault(root(int(i)), []).append(int(i))
    want = sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))
    assert got == want


def test_bad_thresholds_are_input_errors(planted) -> None:
    for bad in (0, 1.5, "0.9", True):
        with pytest.raises(InputError, match="threshold"):
            find_duplicates(planted.snapshot(), bad)


def test_a_threshold_that_pairs_up_too_many_rows_is_refused(planted) -> None:
    for config in (DuplicatesConfig(max_pairs=1000), DuplicatesConfig(max_pairs=1000, probe_rows=1, block_rows=50)):
        with pytest.raises(InputError, match="raise the threshold"):
            find_duplicates(planted.snapshot(), 0.01, config)


def test_command_line_prints_json_and_a_table(planted, capsys) -> None:
    assert main(["duplicates", str(planted.directory), "--threshold", "0.95", "--json", "--limit", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    want = brute_force_groups(planted.array("image_global"), planted.image_ids, 0.95)
    assert [g["members"] for g in report["groups"]] == want[:2]
    assert main(["duplicates", str(planted.directory)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith(f"{len(want)} groups of near-duplicates (cosine >= 0.95) among")
    assert table[2].split()[:2] == ["1", str(len(want[0]))] and want[0][0] in table[2]
    assert main(["duplicates", str(planted.directory), "--threshold", "2"]) == 2
    assert "threshold" in capsys.readouterr().err
