"""Collection readers (engine.sources): ids, payloads, bytes and the problems each source kind reports."""
from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path

import pytest

from conftest import image_bytes, make_image
from engine.errors import ImageDecodeError, InputError
from engine.gallery import list_images
from engine.sources import list_collection, list_source


def _png(seed: int) -> bytes:
    return image_bytes(make_image(40, 30, seed=seed))


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_folder_is_recursive_with_relative_path_ids_and_keeps_gallery_ids(tmp_path: Path) -> None:
    (tmp_path / "cats" / "old").mkdir(parents=True)
    (tmp_path / ".cache").mkdir()
    for name in ["10.png", "2.png", "cats/1.jpg", "cats/old/1.png", ".hidden.png", ".cache/x.png"]:
        (tmp_path / name).write_bytes(_png(len(name)))
    (tmp_path / "notes.txt").write_text("not an image")
    listed = list_source(tmp_path)
    assert [r.id for r in listed.images] == ["2", "10", "cats/1", "cats/old/1"]
    assert [r.payload["source"] for r in listed.images] == ["2.png", "10.png", "cats/1.jpg", "cats/old/1.png"]
    assert listed.problems == []
    top_level = [r.id for r in listed.images if "/" not in r.id]
    gallery = [p.stem for p in list_images(tmp_path) if not p.name.startswith(".")]
    assert top_level == gallery  # the server's --gallery ids are the same ids
    assert listed.images[2].open() == tmp_path / "cats" / "1.jpg"


def test_folder_duplicate_ids_are_reported_not_dropped(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png(1))
    (tmp_path / "a.jpg").write_bytes(_png(2))
    collection = list_collection([tmp_path])
    assert [r.id for r in collection.images] == ["a"]
    assert [p.kind for p in collection.problems] == ["duplicate"]
    assert "a.png" in str(collection.problems[0]) and "'a'" in str(collection.problems[0])


def test_folder_of_shards_points_at_the_shards(tmp_path: Path) -> None:
    write_tar(tmp_path / "000.tar", {"x.png": _png(1)})
    with pytest.raises(InputError, match=r"\.tar shards"):
        list_source(tmp_path)


def test_list_file_resolves_relative_paths_and_takes_ids_after_a_tab(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    for name in ["a.png", "b.png"]:
        (tmp_path / "imgs" / name).write_bytes(_png(len(name)))
    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\nimgs/a.png\n\n{tmp_path / 'imgs' / 'b.png'}\tbee\nmissing.png\n")
    listed = list_source(listing)
    assert [(r.id, r.line) for r in listed.images] == [("a", 2), ("bee", 4), ("missing", 5)]
    assert listed.images[0].open() == tmp_path / "imgs" / "a.png"
    assert listed.images[2].open() == tmp_path / "missing.png"  # reported when read, by the prepare stage


def test_tsv_rows_decode_to_the_image_bytes_and_bad_rows_name_their_line(tmp_path: Path) -> None:
    good = _png(3)
    tsv = tmp_path / "valid_imgs.tsv"
    tsv.write_text(f"7\t{base64.urlsafe_b64encode(good).decode()}\nno-tab-here\n8\t!!!notbase64\n")
    listed = list_source(tsv)
    assert [r.id for r in listed.images] == ["7", "8"]
    assert listed.images[0].open() == good
    assert listed.images[0].payload == {"source": "valid_imgs.tsv:1"}
    assert [(p.line, p.kind) for p in listed.problems] == [(2, "malformed")]
    with pytest.raises(ImageDecodeError, match="base64"):
        listed.images[1].open()
    assert str(listed.images[1].problem(ImageDecodeError("invalid base64"))).startswith(f"{tsv}:3:")


def test_tar_samples_group_by_key_with_caption_and_json_payload(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "shard-000.tar", {
        "s/001.jpg": image_bytes(make_image(30, 20, seed=1), "JPEG"),
        "s/001.txt": "一只猫".encode(),
        "s/001.json": json.dumps({"url": "http://x/1", "w": 30}).encode(),
        "s/002.png": _png(2),
        "s/003.txt": b"caption without an image",
        "s/004.png": _png(4),
        "s/004.json": b"[1, 2]",
    })
    listed = list_source(shard)
    assert [r.id for r in listed.images] == ["s/001", "s/002"]
    first = listed.images[0]
    assert first.payload == {"url": "http://x/1", "w": 30, "caption": "一只猫", "source": "shard-000.tar:s/001.jpg"}
    assert first.open() == image_bytes(make_image(30, 20, seed=1), "JPEG")
    assert first.where == f"{shard}:s/001.jpg"
    assert sorted((p.kind, p.file) for p in listed.problems) == [
        ("malformed", f"{shard}:s/004"), ("missing_image", f"{shard}:s/003")]


def test_truncated_tar_member_is_reported_with_the_member(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "cut.tar", {"a.png": _png(1), "b.png": _png(2)})
    ref = list_source(shard).images[1]
    shard.write_bytes(shard.read_bytes()[:ref.offset + 10])
    with pytest.raises(ImageDecodeError, match="truncated tar member") as caught:
        ref.open()
    assert str(ref.problem(caught.value)).startswith(f"{shard}:b.png: image 'b'")


def test_sources_combine_and_ids_must_be_unique_across_them(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "s").mkdir()
    (tmp_path / "dir" / "s" / "001.png").write_bytes(_png(1))
    shard = write_tar(tmp_path / "a.tar", {"s/001.png": _png(1), "s/002.png": _png(2)})
    collection = list_collection([tmp_path / "dir", shard])
    assert [r.id for r in collection.images] == ["s/001", "s/002"]
    assert [p.kind for p in collection.problems] == ["duplicate"]


@pytest.mark.parametrize("name, message", [("x.tar.gz", "compressed"), ("x.png", "is an image")])
def test_unsupported_sources_say_why(tmp_path: Path, name: str, message: str) -> None:
    (tmp_path / name).write_bytes(b"data")
    with pytest.raises(InputError, match=message):
        list_source(tmp_path / name)
    with pytest.raises(InputError, match="not found"):
        list_source(tmp_path / "absent")
