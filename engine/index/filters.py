"""Payload filters: a `where=` JSON object parsed once into a small tree, evaluated per segment part into a row bitmap.

Operators: a bare value (`$eq`), `$eq`, `$ne`, `$in`, `$nin`, `$gt`, `$gte`, `$lt`, `$lte`, `$exists` on top-level
payload keys, and `$and` / `$or` over sub-filters (at most MAX_DEPTH levels). Numbers compare with numbers,
strings with strings (code-point order); a value of another type simply does not match (`$ne` / `$nin` are the
negations of `$eq` / `$in`, so they match it, and rows without the key). A payload value that is a list matches
`$eq` / `$in` when one of its elements does. Parts are immutable, so a filter's bitmap is cached on its part
(bounded LRU, keyed by the filter's canonical JSON) and never invalidated.
"""
from __future__ import annotations

import json
import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Union

import numpy as np

from ..errors import InputError
from .segment import Part
from .snapshot import LiveSegment, Snapshot

MAX_DEPTH = 8
MAX_IN_VALUES = 1024
_COMPARE = ("$gt", "$gte", "$lt", "$lte")
_FIELD_OPS = ("$eq", "$ne", "$in", "$nin", *_COMPARE, "$exists")
_BITMAPS_PER_PART = 32
_COLUMNS_PER_PART = 16
_RESTRICTED_ENTRIES = 16
Scalar = Union[str, int, float, bool, None]


@dataclass(frozen=True)
class Condition:
    """One operator on one payload key."""

    key: str
    op: str
    value: Any


@dataclass(frozen=True)
class Combined:
    """`$and` (all) or `$or` (any) of sub-filters."""

    op: str
    children: tuple["Node", ...]


Node = Union[Condition, Combined]


@dataclass(frozen=True)
class Filter:
    """A parsed `where=` object: its tree and its canonical JSON (the cache key)."""

    root: Node
    key: str

    @classmethod
    def parse(cls, obj: Any) -> "Filter":
        """Validate `obj`; an InputError names the bad operator, key or value."""
        if isinstance(obj, Filter):
            return obj
        root = _parse(obj, 1, "where")
        return cls(root, json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")))

    def matches(self, part: Part) -> np.ndarray:
        """bool [rows] of the part: which rows' payloads match (cached on the part)."""
        return _cache(part).bitmap(self)


def parse_where(where: Any) -> Filter | None:
    """None for no filter (None or an empty object), else the parsed Filter."""
    if where is None or isinstance(where, Filter):
        return where
    if isinstance(where, dict) and not where:
        return None
    return Filter.parse(where)


def _parse(obj: Any, depth: int, at: str) -> Node:
    if depth > MAX_DEPTH:
        raise InputError(f"{at}: filter nested deeper than {MAX_DEPTH} levels")
    if not isinstance(obj, dict) or not obj:
        raise InputError(f"{at}: a filter must be a non-empty JSON object, got {_show(obj)}")
    nodes: list[Node] = []
    for key, value in obj.items():
        if not isinstance(key, str):
            raise InputError(f"{at}: keys must be strings, got {key!r}")
        if key in ("$and", "$or"):
            if not isinstance(value, list) or not value:
                raise InputError(f"{at}.{key}: needs a non-empty list of filters, got {_show(value)}")
            children = tuple(_parse(item, depth + 1, f"{at}.{key}[{i}]") for i, item in enumerate(value))
            nodes.append(Combined(key, children))
        elif key.startswith("$"):
            raise InputError(f"{at}: unknown operator {key!r} (known: $and, $or, and per key "
                             f"{', '.join(_FIELD_OPS)})")
        else:
            nodes.extend(_field(key, value, f"{at}.{key}"))
    return nodes[0] if len(nodes) == 1 else Combined("$and", tuple(nodes))


def _field(key: str, value: Any, at: str) -> list[Condition]:
    if not isinstance(value, dict):
        return [Condition(key, "$eq", _scalar(value, at))]
    if not value or not all(isinstance(op, str) and op.startswith("$") for op in value):
        raise InputError(f"{at}: an object value must hold operators ($eq, $gt, ...), got {_show(value)}")
    out = []
    for op, operand in value.items():
        where = f"{at}.{op}"
        if op in ("$eq", "$ne"):
            out.append(Condition(key, op, _scalar(operand, where)))
        elif op in ("$in", "$nin"):
            if not isinstance(operand, list) or len(operand) > MAX_IN_VALUES:
                raise InputError(f"{where}: needs a list of at most {MAX_IN_VALUES} values, got {_show(operand)}")
            out.append(Condition(key, op, tuple(_scalar(v, f"{where}[{i}]") for i, v in enumerate(operand))))
        elif op in _COMPARE:
            if isinstance(operand, bool) or not isinstance(operand, (int, float, str)) or _nan(operand):
                raise InputError(f"{where}: needs a number or a string, got {_show(operand)}")
            out.append(Condition(key, op, operand))
        elif op == "$exists":
            if not isinstance(operand, bool):
                raise InputError(f"{where}: needs true or false, got {_show(operand)}")
            out.append(Condition(key, op, operand))
        else:
            raise InputError(f"{at}: unknown operator {op!r} (known: {', '.join(_FIELD_OPS)})")
    return out


def _scalar(value: Any, at: str) -> Scalar:
    if value is None or isinstance(value, (str, bool)) or (isinstance(value, (int, float)) and not _nan(value)):
        return value
    raise InputError(f"{at}: needs a string, number, true, false or null, got {_show(value)}")


def _nan(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= 80 else text[:77] + "..."


# ---- evaluation -------------------------------------------------------------------------------------------------

class _Missing:
    pass


MISSING = _Missing()


class KeyColumn:
    """One payload key over a part's rows, as arrays the operators compare at once."""

    def __init__(self, values: list[Any]) -> None:
        n = len(values)
        self.present = np.array([v is not MISSING for v in values], dtype=bool)
        self.number = np.full(n, np.nan)
        self.text = np.full(n, "", dtype=object)  # object, not fixed-width: one long string would widen all
        self.is_text = np.zeros(n, dtype=bool)
        self.flag = np.full(n, -1, dtype=np.int8)  # booleans: 0 / 1
        self.null = np.zeros(n, dtype=bool)
        self.lists: dict[int, list] = {}
        for row, v in enumerate(values):
            if isinstance(v, bool):
                self.flag[row] = int(v)
            elif isinstance(v, (int, float)):
                self.number[row] = v
            elif isinstance(v, str):
                self.text[row], self.is_text[row] = v, True
            elif v is None:
                self.null[row] = True
            elif isinstance(v, list):
                self.lists[row] = v

    def equal(self, value: Scalar) -> np.ndarray:
        if isinstance(value, bool):
            out = self.flag == int(value)
        elif value is None:
            out = self.null.copy()
        elif isinstance(value, (int, float)):
            out = self.number == value
        else:
            out = self.is_text & (self.text == value)
        for row, items in self.lists.items():
            out[row] = any(same(item, value) for item in items)
        return out

    def compare(self, op: str, value: Union[int, float, str]) -> np.ndarray:
        if isinstance(value, str):
            left, valid = self.text, self.is_text
        else:
            left, valid = self.number, ~np.isnan(self.number)
        with np.errstate(invalid="ignore"):
            result = {"$gt": left > value, "$gte": left >= value, "$lt": left < value, "$lte": left <= value}[op]
        return valid & result


def same(item: Any, value: Scalar) -> bool:
    """Equality within one type: numbers with numbers (not booleans), strings with strings, booleans, null."""
    if isinstance(value, bool) or isinstance(item, bool):
        return isinstance(item, bool) and isinstance(value, bool) and item == value
    if isinstance(value, (int, float)):
        return isinstance(item, (int, float)) and item == value
    return type(item) is type(value) and item == value


class _PartCache:
    """A part's evaluated filters and key columns (both bounded LRU)."""

    def __init__(self, part: Part) -> None:
        self.part = weakref.ref(part)
        self.rows = part.rows
        self.bitmaps: OrderedDict[str, np.ndarray] = OrderedDict()
        self.columns: OrderedDict[str, KeyColumn] = OrderedDict()
        self.lock = threading.Lock()

    def bitmap(self, where: Filter) -> np.ndarray:
        with self.lock:
            found = self.bitmaps.get(where.key)
            if found is not None:
                self.bitmaps.move_to_end(where.key)
                return found
        out = self.evaluate(where.root)
        out.setflags(write=False)
        with self.lock:
            self.bitmaps[where.key] = out
            while len(self.bitmaps) > _BITMAPS_PER_PART:
                self.bitmaps.popitem(last=False)
        return out

    def evaluate(self, node: Node) -> np.ndarray:
        if isinstance(node, Combined):
            parts = [self.evaluate(child) for child in node.children]
            return np.logical_and.reduce(parts) if node.op == "$and" else np.logical_or.reduce(parts)
        column = self.column(node.key)
        if node.op == "$exists":
            return column.present.copy() if node.value else ~column.present
        if node.op in ("$eq", "$ne"):
            hit = column.equal(node.value)
            return hit if node.op == "$eq" else ~hit
        if node.op in ("$in", "$nin"):
            hit = np.zeros(self.rows, dtype=bool)
            for value in node.value:
                hit |= column.equal(value)
            return hit if node.op == "$in" else ~hit
        return column.compare(node.op, node.value)

    def column(self, key: str) -> KeyColumn:
        with self.lock:
            found = self.columns.get(key)
            if found is not None:
                self.columns.move_to_end(key)
                return found
        part = self.part()
        values = list(payload_values(part.payload_bytes(), key))
        column = KeyColumn(values)
        with self.lock:
            self.columns[key] = column
            while len(self.columns) > _COLUMNS_PER_PART:
                self.columns.popitem(last=False)
        return column


def payload_values(blobs: list[bytes], key: str, chunk: int = 65536) -> Iterable[Any]:
    """The value of `key` in each encoded payload (MISSING where absent), decoded a chunk of rows per json.loads
    call (one JSON array: about 3x faster than a call per row)."""
    for start in range(0, len(blobs), chunk):
        rows = json.loads(b"[" + b",".join(blob or b"null" for blob in blobs[start:start + chunk]) + b"]")
        for payload in rows:
            yield payload.get(key, MISSING) if isinstance(payload, dict) else MISSING


_CACHES: "weakref.WeakKeyDictionary[Part, _PartCache]" = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def _cache(part: Part) -> _PartCache:
    with _CACHES_LOCK:
        cache = _CACHES.get(part)
        if cache is None:
            cache = _CACHES[part] = _PartCache(part)
        return cache


_RESTRICTED: "OrderedDict[tuple, tuple[weakref.ref, LiveSegment, np.ndarray]]" = OrderedDict()


def restrict(live: LiveSegment, part: Part, kind: str, where: Filter) -> tuple[LiveSegment, np.ndarray]:
    """(`live` with the rows `where` rejects masked like deleted rows, in the boolean mask and in the packed live
    bitmap FAISS filters with; the sorted rows still allowed). Cached per live segment and filter (bounded)."""
    key = (id(live), kind, where.key)
    with _CACHES_LOCK:
        found = _RESTRICTED.get(key)
        if found is not None and found[0]() is live:
            _RESTRICTED.move_to_end(key)
            return found[1], found[2]
    excluded = ~where.matches(part)
    deleted = live.masks.get(kind)
    if deleted is not None:
        excluded |= deleted
    masks = {**live.masks, kind: excluded}
    bits = {**live.live_bits, kind: np.packbits(~excluded, bitorder="little")}
    restricted = LiveSegment(live.segment, live.deleted, masks, bits)
    allowed = np.flatnonzero(~excluded)
    with _CACHES_LOCK:
        _RESTRICTED[key] = (weakref.ref(live), restricted, allowed)
        while len(_RESTRICTED) > _RESTRICTED_ENTRIES:
            _RESTRICTED.popitem(last=False)
    return restricted, allowed


# ---- what the page shows -----------------------------------------------------------------------------------------

def payload_keys(snapshot: Snapshot, kind: str, limit: int = 10_000, examples: int = 5) -> list[dict[str, Any]]:
    """Keys seen in the payloads of the first `limit` live rows of `kind`: each with its JSON types and up to
    `examples` distinct scalar values, most frequent keys first."""
    seen: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    remaining = limit
    for _, live, part in snapshot.parts(kind):
        if remaining <= 0:
            break
        for row in live.live_rows(kind)[:remaining]:
            payload = part.payload(int(row))
            for key, value in (payload or {}).items():
                entry = seen.setdefault(key, {"key": key, "types": [], "examples": []})
                counts[key] = counts.get(key, 0) + 1
                name = json_type(value)
                if name not in entry["types"]:
                    entry["types"].append(name)
                if (len(entry["examples"]) < examples and name in ("string", "number", "boolean")
                        and value not in entry["examples"]):
                    entry["examples"].append(value)
        remaining -= live.live(kind)
    return sorted(seen.values(), key=lambda e: (-counts[e["key"]], e["key"]))


def json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    return "array" if isinstance(value, list) else "object"
