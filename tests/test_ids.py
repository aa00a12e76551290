"""The id rule (engine.ids): types, length, valid Unicode, no control characters, int64, and 3 == "3"."""
from __future__ import annotations

import pytest

from engine import InputError
from engine.ids import MAX_ID_LENGTH, check_ids, id_key


@pytest.mark.parametrize("ids, message", [
    (["ok", "\ud800"], r"id #1 .*lone surrogate"),
    (["a\x00b"], r"id #0 .*U\+0000"),
    (["tab\there"], r"id #0 .*U\+0009"),
    (["x" * (MAX_ID_LENGTH + 1)], r"id #0 has 257 characters"),
    ([2 ** 63], r"id #0 is an int outside the int64 range"),
    ([-(2 ** 63) - 1], "int64"),
    ([True], r"id #0 is True \(bool\)"),
    ([1.5], r"id #0 is 1.5 \(float\)"),
    ([None], "NoneType"),
    ([""], "empty string"),
    (["a", "a"], r"id #1: duplicate id 'a'"),
    ([3, "3"], r"id #1: duplicate id '3'"),
])
def test_bad_ids_are_named_by_position(ids, message):
    with pytest.raises(InputError, match=message):
        check_ids(ids)


def test_valid_ids_pass_unchanged():
    ids = ["x" * MAX_ID_LENGTH, 2 ** 63 - 1, -(2 ** 63), "敦煌 飞天", "emoji 😀", 0]
    assert check_ids(ids) == ids


def test_int_and_str_forms_are_one_id():
    assert id_key(3) == id_key("3")
    with pytest.raises(InputError, match="duplicate id 3"):
        check_ids([3], existing=["3"])
    with pytest.raises(InputError, match="duplicate id '7'"):
        check_ids(["7"], existing=lambda key: key == "7")
    assert check_ids([4], existing=["3", 5]) == [4]


def test_ids_must_be_a_list():
    with pytest.raises(InputError, match="ids must be a list"):
        check_ids("abc")
