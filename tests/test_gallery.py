"""engine.gallery's JSON-lines reader keeps each line's other keys as the text's payload, so a cn_clip-style
`image_ids` pairing reaches the index from `--texts` (server and `python -m engine index`) and the HTTP upload."""
from __future__ import annotations

import json

import pytest

from engine.errors import InputError
from engine.gallery import parse_texts_jsonl, read_texts_jsonl

LINES = [json.dumps({"text_id": 7, "text": "飞天", "image_ids": [1, 2]}, ensure_ascii=False), "",
         json.dumps({"id": "b", "text": "牡丹"}, ensure_ascii=False),
         json.dumps({"text": "无编号", "source": "诗经", "n": 3}, ensure_ascii=False)]


def test_other_keys_become_the_payload_and_ids_follow_the_rule():
    records = parse_texts_jsonl(LINES, "caps.jsonl")
    assert records.ids == [7, "b", 2] and records.texts == ["飞天", "牡丹", "无编号"]
    assert records.payloads == [{"image_ids": [1, 2]}, None, {"source": "诗经", "n": 3}]
    kept = records.where(lambda text_id: text_id != "b")
    assert (kept.ids, kept.texts, kept.payloads) == ([7, 2], ["飞天", "无编号"], [{"image_ids": [1, 2]},
                                                                            {"source": "诗经", "n": 3}])


def test_a_file_reads_the_same_and_bad_lines_are_named(tmp_path):
    path = tmp_path / "caps.jsonl"
    path.write_text("\n".join(LINES), encoding="utf-8")
    assert read_texts_jsonl(path) == parse_texts_jsonl(LINES, str(path))
    path.write_text(LINES[0] + "\n{\"text\": 5}\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"caps\.jsonl line 2: expected an object with a string 'text'"):
        read_texts_jsonl(path)


def test_the_server_gallery_stores_paired_captions(tmp_path):
    from engine import Retriever
    from engine.serve.core import index_gallery

    (tmp_path / "imgs").mkdir()
    path = tmp_path / "caps.jsonl"
    path.write_text("\n".join(LINES), encoding="utf-8")
    retriever = Retriever.from_checkpoint(None, model="tiny", laclip=None)
    index_gallery(retriever, tmp_path / "imgs", path)
    assert retriever.index.payload("texts", "7") == {"image_ids": [1, 2], "text": "飞天"}
    assert retriever.index.payload("texts", "b") == {"text": "牡丹"}
