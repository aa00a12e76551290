"""No laundering: damage to any byte of a segment file is named by `python -m engine verify` and by
`engine.index.verification.verify_index`, refused by compaction without changing the index, and never served as
a silent wrong answer or a crash (opening checks the id and payload columns; every read names the file)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import LaclipConfig
from engine.errors import IndexFormatError
from engine.index import COMMIT, CompactionPolicy, Index, IndexManifest
from engine.index.verification import verify_index

D, K = 8, 2
FLIPS = 20


def _unit(*shape: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """An index of three segments (images with crops, payloads and thumbnails; texts) and one delete file."""
    root = tmp_path_factory.mktemp("integrity") / "index"
    index = Index.create(root, IndexManifest("tiny", "abc", D, LaclipConfig(num_crops=K)),
                         policy=CompactionPolicy(max_small=100, max_deleted_fraction=1.0))
    for s in range(3):
        ids = [f"s{s}/{i}" for i in range(7 + s)]
        index.add_images(ids, _unit(len(ids), D, seed=s), _unit(len(ids), K, D, seed=10 + s),
                         [{"album": "敦煌", "n": i} for i in range(len(ids))], [b"\xff\xd8jpeg" * 3] * len(ids))
    index.add_texts([100, 101, 102], _unit(3, D, seed=99), [{"text": "飞天"}, None, {"text": "牡丹"}])
    index.delete_images(["s1/2"])
    return root


def _files(root: Path) -> list[Path]:
    return sorted((root / "segments").glob("*.seg"))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_clean_index_verifies_and_the_cli_says_so(clean):
    report = verify_index(clean)
    assert report.ok and report.segments == 4 and report.delete_files == 1, report.summary()
    done = subprocess.run([sys.executable, "-m", "engine", "verify", str(clean)], capture_output=True, text=True)
    assert done.returncode == 0 and "0 damaged" in done.stdout


def test_every_random_byte_flip_is_named_never_laundered_never_a_crash(clean, tmp_path):
    rng = np.random.default_rng(2024)
    for trial in range(FLIPS):
        root = tmp_path / f"t{trial}"
        shutil.copytree(clean, root)
        victim = _files(root)[rng.integers(len(_files(root)))]
        data = bytearray(victim.read_bytes())
        offset = int(rng.integers(len(data)))
        data[offset] ^= 1 << int(rng.integers(8))
        victim.write_bytes(bytes(data))
        where = f"{victim.name} at byte {offset}"

        report = verify_index(root)
        assert [d.file for d in report.damaged] == [f"segments/{victim.name}"], (where, report.summary())

        before = _snapshot(root)
        try:
            index = Index.open(root)
        except IndexFormatError as exc:  # the header, ids or payloads: refused at open, naming the file
            assert victim.name in str(exc), where
            continue
        for exact in (True, False):  # a search answers or names the file, never another error (a 500)
            try:
                index.search_images(_unit(2, D, seed=trial), 5, score=None, exact=exact)
                index.search_texts(_unit(1, D, seed=trial), _unit(1, K, D, seed=trial), 3, score=None, exact=exact)
            except IndexFormatError as exc:
                assert victim.name in str(exc), where
        with pytest.raises(IndexFormatError, match=victim.name):
            index.compact()
        assert _snapshot(root) == before, f"{where}: a refused compaction changed the directory"
        assert not verify_index(root).ok, f"{where}: laundered"


def test_the_cli_exits_1_and_names_each_damaged_file(clean, tmp_path):
    root = tmp_path / "two"
    shutil.copytree(clean, root)
    damaged = _files(root)[:2]
    for seg in damaged:
        data = bytearray(seg.read_bytes())
        data[-70] ^= 0x10  # inside the last column's data or its padding
        seg.write_bytes(bytes(data))
    done = subprocess.run([sys.executable, "-m", "engine", "verify", str(root)], capture_output=True, text=True)
    assert done.returncode == 1
    for seg in damaged:
        assert f"segments/{seg.name}" in done.stderr
    assert str(tmp_path) not in done.stderr  # names relative to the index


def test_a_damaged_payload_or_id_is_refused_at_open_naming_the_file(clean, tmp_path):
    for column in (b'"album"', b"s0/3"):
        root = tmp_path / column.decode().strip('"').replace("/", "_")
        shutil.copytree(clean, root)
        for seg in _files(root):
            data = seg.read_bytes()
            # the header names columns as text; find the column data itself, after the header
            at = data.find(column, 4096 if len(data) > 8192 else data.find(b"}" + b" " * 8) + 1)
            if at > 0:
                seg.write_bytes(data[:at] + b"X" + data[at + 1:])
                with pytest.raises(IndexFormatError, match=rf"{seg.name}: column images\.(payload|id)_data fails"):
                    Index.open(root)
                break
        else:
            pytest.fail(f"no segment holds {column!r}")


def test_a_damaged_delete_file_is_refused(clean, tmp_path):
    root = tmp_path / "deletes"
    shutil.copytree(clean, root)
    (npy,) = (root / "deletes").glob("*.npy")
    data = bytearray(npy.read_bytes())
    data[-8] ^= 0x01  # the low byte of the last row number (2 -> 3): in range, only the checksum can tell
    npy.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match="checksum in its name"):
        Index.open(root)
    assert [d.file for d in verify_index(root).damaged] == [f"deletes/{npy.name}"]


def test_a_damaged_commit_is_reported_not_raised(clean, tmp_path):
    root = tmp_path / "commit"
    shutil.copytree(clean, root)
    (root / COMMIT).write_text("{not json")
    report = verify_index(root)
    assert [d.file for d in report.damaged] == ["index.json"]


def test_the_server_refuses_to_serve_a_damaged_index_with_verify_on_start(clean, tmp_path):
    from engine.serve.launcher import free_port

    root = tmp_path / "served"
    shutil.copytree(clean, root)
    seg = _files(root)[0]
    data = bytearray(seg.read_bytes())
    data[-70] ^= 0x04
    seg.write_bytes(bytes(data))
    done = subprocess.run([sys.executable, "-m", "engine.serve", "--model", "tiny", "--index", str(root),
                           "--verify-on-start", "--port", str(free_port()), "--log-level", "warning"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode != 0
    assert "--verify-on-start: index served is damaged" in done.stderr and f"segments/{seg.name}" in done.stderr, \
        done.stderr[-800:]


def test_index_verify_is_the_full_check_naming_the_damaged_file(clean, tmp_path):
    """Index.verify() on disk runs verify_index: a vector byte flipped under an open index (opening reads only the
    ids and payloads) is named by the same report as `python -m engine verify`."""
    root = tmp_path / "open"
    shutil.copytree(clean, root)
    index = Index.open(root)
    index.verify()
    target = _files(root)[0]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x40
    target.write_bytes(bytes(data))
    expected = [d.file for d in verify_index(root).damaged]
    assert expected == [f"segments/{target.name}"]
    with pytest.raises(IndexFormatError, match=f"segments/{target.name}"):
        index.verify()
