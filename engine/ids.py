"""The one id rule: what an item id may be, and when two ids are the same id.

An id is a str of 1..256 characters that is valid Unicode text (encodable as UTF-8, so no lone surrogates)
without control characters (Unicode category Cc), or an int (not bool) in the int64 range. Two ids are the
same id when `str(a) == str(b)`: `3` and `"3"` are one id (`id_key` gives that canonical key).

Default ids (`default_ids`): an image given by a file name or path has its file stem (for a folder, the path
relative to it without suffix: engine.gallery's folder-id rule), anything else an integer counting on from the
largest int id the index has held.
"""
from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

from .errors import InputError

Id = Union[str, int]
MAX_ID_LENGTH = 256
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def id_key(item: Id) -> str:
    """The canonical key of an id: ids with equal keys are the same id."""
    return str(item)


def check_id(item: Any, position: int = 0) -> Id:
    """`item` if it is a valid id, else an InputError naming its position."""
    where = f"id #{position}"
    if isinstance(item, bool) or not isinstance(item, (str, int)):
        raise InputError(f"{where} is {_short(item)} ({type(item).__name__}); ids must be str or int")
    if isinstance(item, int):
        if not INT64_MIN <= item <= INT64_MAX:
            raise InputError(f"{where} is an int outside the int64 range: {_short(item)}")
        return item
    if not item:
        raise InputError(f"{where} is an empty string")
    if len(item) > MAX_ID_LENGTH:
        raise InputError(f"{where} has {len(item)} characters; at most {MAX_ID_LENGTH} are allowed")
    try:
        item.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{where} {_short(item)} is not valid Unicode text (lone surrogate)") from None
    for char in item:
        if unicodedata.category(char) == "Cc":
            raise InputError(f"{where} {_short(item)} contains the control character U+{ord(char):04X}")
    return item


def check_ids(ids: Sequence[Any], existing: Iterable[Id] | Callable[[str], bool] = ()) -> list[Id]:
    """Validate ids: each valid, no two the same id, none already present.

    `existing` is the ids already present, or a predicate telling whether a key is present (an index with
    a million rows answers that without listing them)."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
        raise InputError(f"ids must be a list, got {type(ids).__name__}")
    present: Callable[[str], bool]
    if callable(existing):
        present = existing
    else:
        known = {id_key(e) for e in existing}
        present = known.__contains__
    seen: set[str] = set()
    out: list[Id] = []
    for position, item in enumerate(ids):
        checked = check_id(item, position)
        key = id_key(checked)
        if key in seen or present(key):
            raise InputError(f"id #{position}: duplicate id {checked!r}")
        seen.add(key)
        out.append(checked)
    return out


def default_ids(items: Sequence[Any], what: str, first_counter: int) -> list[Id]:
    """Ids for new `what` ("images" or "texts") given none: an image's file stem when the item is a file name or
    path (str or Path), else `first_counter`, `first_counter + 1`, ... in order."""
    counter = first_counter
    out: list[Id] = []
    for item in items:
        if what == "images" and isinstance(item, (str, Path)) and str(item):
            out.append(Path(item).stem)
        else:
            out.append(counter)
            counter += 1
    return out


def _short(item: Any) -> str:
    text = repr(item)
    return text if len(text) <= 60 else text[:57] + "..."
