"""Durable files: the segment container (many named arrays in one memory-mapped file) and atomic small writes.

A container is `MAGIC | u64 header length | JSON header | columns`, each column 64-byte aligned. The header
names every column's dtype, shape, offset, size and CRC-32, plus free-form metadata. Opening maps the file
once and returns zero-copy views, so opening costs the header, not the rows; `verify_container` reads
everything and checks the CRCs. One file per segment keeps an add at one data fsync.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import IndexFormatError

MAGIC = b"CNCLIPSG"
_ALIGN = 64
_DTYPES = {"float32", "float16", "int64", "uint64", "uint8", "bool"}
_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class RowStream:
    """Rows of one or more arrays, concatenated, taken in `order` (all of them in turn when None), cast to `dtype`.

    Lets a writer stream gathered, reordered or down-cast rows (compaction, IVF order, fp16 storage) in chunks
    instead of materialising them."""

    pieces: Sequence[tuple[np.ndarray, np.ndarray | None]]
    dtype: np.dtype
    order: np.ndarray | None = None

    @classmethod
    def of(cls, array: np.ndarray, dtype: Any = None, order: np.ndarray | None = None) -> "RowStream":
        return cls([(array, None)], np.dtype(dtype or array.dtype), order)

    @property
    def _lengths(self) -> list[int]:
        return [len(a) if rows is None else len(rows) for a, rows in self.pieces]

    @property
    def shape(self) -> tuple[int, ...]:
        n = len(self.order) if self.order is not None else sum(self._lengths)
        return (n, *self.pieces[0][0].shape[1:])

    def take(self, positions: np.ndarray) -> np.ndarray:
        """The rows at `positions` of the concatenation, in that order, as `dtype`."""
        starts = np.cumsum([0, *self._lengths])
        out = np.empty((len(positions), *self.shape[1:]), dtype=self.dtype)
        piece_of = np.searchsorted(starts, positions, side="right") - 1
        for p, (array, rows) in enumerate(self.pieces):
            mask = piece_of == p
            if not mask.any():
                continue
            local = positions[mask] - starts[p]
            source = local if rows is None else rows[local]
            out[mask] = _gather(array, source)
        return out

    def chunks(self) -> Iterator[np.ndarray]:
        n = self.shape[0]
        row_bytes = max(1, int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize)
        step = max(1, _CHUNK_BYTES // row_bytes)
        for start in range(0, n, step):
            stop = min(n, start + step)
            positions = self.order[start:stop] if self.order is not None else np.arange(start, stop)
            yield self.take(positions)


Rows = RowStream  # the earlier name, still imported by engine/index/ann.py (issue #30's file)


def _gather(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """array[rows], reading a contiguous slice when the rows are consecutive (memory-mapped sources)."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
        return array[rows[0]:rows[-1] + 1]
    return array[rows]


def write_container(path: Path, columns: dict[str, np.ndarray | RowStream], meta: dict[str, Any]) -> None:
    """Write a container file and fsync it (the caller renames it into place and fsyncs the folder)."""
    sources = {name: value if isinstance(value, RowStream) else RowStream.of(np.asarray(value))
               for name, value in columns.items()}
    layout, offset = {}, 0
    for name, rows in sources.items():
        if rows.dtype.name not in _DTYPES:
            raise TypeError(f"column {name}: unsupported dtype {rows.dtype}")
        nbytes = int(np.prod(rows.shape, dtype=np.int64)) * rows.dtype.itemsize
        layout[name] = {"dtype": rows.dtype.name, "shape": list(rows.shape), "offset": offset, "nbytes": nbytes}
        offset += _aligned(nbytes)
    crcs: dict[str, int] = {}
    header_len = _aligned(len(_header(meta, layout, {name: 0xFFFFFFFF for name in layout})) + 16)
    with open(path, "wb") as f:
        f.seek(header_len)
        for name, rows in sources.items():
            crc = 0
            for chunk in rows.chunks():
                data = memoryview(np.ascontiguousarray(chunk, dtype=rows.dtype)).cast("B")
                crc = zlib.crc32(data, crc)
                f.write(data)
            f.write(b"\0" * (_aligned(layout[name]["nbytes"]) - layout[name]["nbytes"]))
            crcs[name] = crc
        header = _header(meta, layout, crcs)
        header += b" " * (header_len - 16 - len(header))  # the reserved area: data starts at header_len
        f.seek(0)
        f.write(MAGIC + struct.pack("<Q", len(header)) + header)
        f.flush()
        os.fsync(f.fileno())


def _header(meta: dict[str, Any], layout: dict[str, dict], crcs: dict[str, int]) -> bytes:
    columns = {name: {**spec, "crc32": crcs[name]} for name, spec in layout.items()}
    return json.dumps({"meta": meta, "columns": columns}, ensure_ascii=False, sort_keys=True).encode()


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class _Layout:
    """A container's parsed header: the JSON text (with its reserved spaces), meta, column specs, where the data
    starts, and a copy-on-write map of the whole file (never written; writeable views hand to torch without a copy)."""

    text: bytes
    meta: dict[str, Any]
    columns: dict[str, Any]
    data_start: int
    raw: np.ndarray


def _layout(path: Path) -> _Layout:
    """The header of one container, checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
        if len(head) < 16 or head[:8] != MAGIC:
            raise IndexFormatError(f"{path}: not a segment file (bad magic or truncated)")
        (length,) = struct.unpack("<Q", head[8:])
        if length > size - 16:
            raise IndexFormatError(f"{path}: truncated header")
        text = f.read(length)
    header = json.loads(text)
    meta, columns = header["meta"], header["columns"]
    data_start = _aligned(16 + length)
    raw = np.memmap(path, dtype=np.uint8, mode="c") if size else np.zeros(0, np.uint8)
    end = data_start + max((int(c["offset"]) + _aligned(int(c["nbytes"])) for c in columns.values()), default=0)
    if size != end:
        raise IndexFormatError(f"{path}: {size} bytes, the header describes {end} (truncated or damaged)")
    return _Layout(text, meta, columns, data_start, raw)


def _column_views(path: Path, layout: _Layout, verify: Callable[[str], bool]) -> dict[str, np.ndarray]:
    """Read-only views of every column; those for which `verify(name)` holds are checked against their CRC-32."""
    views = {}
    for name, spec in layout.columns.items():
        dtype, shape = np.dtype(spec["dtype"]), tuple(int(x) for x in spec["shape"])
        start, nbytes = layout.data_start + int(spec["offset"]), int(spec["nbytes"])
        if spec["dtype"] not in _DTYPES or nbytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise IndexFormatError(f"{path}: column {name} has an inconsistent dtype/shape/size")
        if start + nbytes > len(layout.raw):
            raise IndexFormatError(f"{path}: column {name} runs past the end of the file (truncated)")
        views[name] = layout.raw[start:start + nbytes].view(dtype).reshape(shape)
        if verify(name):
            _check_crc(path, name, views[name], spec)
    return views


def _parsed(path: Path, verify: Callable[[str], bool]) -> tuple[_Layout, dict[str, np.ndarray]]:
    """The layout and column views of one container; any fault becomes an IndexFormatError naming the file."""
    try:
        layout = _layout(path)
        return layout, _column_views(path, layout, verify)
    except IndexFormatError:
        raise
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise IndexFormatError(f"{path}: damaged segment file ({exc.__class__.__name__}: {exc})") from exc


def read_container(path: Path, verify: Callable[[str], bool] = lambda name: False,
                   ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(meta, read-only column views over one memory map); an IndexFormatError names the file and the fault.
    Columns for which `verify(name)` holds are read at once and checked against their CRC-32 (small ones: ids
    and payloads, whose damage would otherwise rename or drop rows silently)."""
    layout, views = _parsed(path, verify)
    return layout.meta, views


def verify_container(path: Path) -> None:
    """Check every byte the writer wrote: each column against its CRC-32, the header's reserved area (spaces) and
    the alignment gaps (zeros); an IndexFormatError names the file and the column or area."""
    layout, _ = _parsed(path, lambda name: True)
    raw, text = layout.raw, layout.text
    json_end = 16 + len(text.rstrip(b" "))
    if np.any(raw[json_end:16 + len(text)] != ord(" ")) or np.any(raw[16 + len(text):layout.data_start] != 0):
        raise IndexFormatError(f"{path}: the header's reserved area is damaged")
    for name, spec in layout.columns.items():
        gap_start = layout.data_start + int(spec["offset"]) + int(spec["nbytes"])
        gap_end = layout.data_start + int(spec["offset"]) + _aligned(int(spec["nbytes"]))
        if np.any(raw[gap_start:gap_end] != 0):
            raise IndexFormatError(f"{path}: the padding after column {name} is damaged")


def _check_crc(path: Path, name: str, view: np.ndarray, spec: dict[str, Any]) -> None:
    flat = view.reshape(-1).view(np.uint8)
    crc = 0
    for start in range(0, len(flat), _CHUNK_BYTES):
        crc = zlib.crc32(memoryview(np.ascontiguousarray(flat[start:start + _CHUNK_BYTES])), crc)
    if crc != spec.get("crc32"):
        raise IndexFormatError(f"{path}: column {name} fails its checksum (damaged)")


def deletes_file_name(segment: str, kind: str, rows: np.ndarray) -> str:
    """The name of a new delete file: segment, kind, a time stamp, and the CRC-32 of its int64 rows."""
    return f"{segment}.{kind}.{time.time_ns():x}.{_rows_crc(rows)}.npy"


def deletes_file_intact(name: str, rows: np.ndarray) -> bool:
    """Whether `rows` match the CRC-32 in a delete file's name (files of earlier releases carry none: True)."""
    parts = name.split(".")
    return len(parts) != 5 or parts[3] == _rows_crc(rows)


def _rows_crc(rows: np.ndarray) -> str:
    return f"{zlib.crc32(np.ascontiguousarray(rows, np.int64).tobytes()):08x}"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Replace `path` by `data` as JSON, atomically and durably (see write_bytes_atomic)."""
    write_bytes_atomic(path, json.dumps(data, ensure_ascii=False).encode("utf-8"))


def temp_tag() -> str:
    """What marks this process's temporary files: `tmp-<pid>@<host>-`, so a sweep can tell a dead writer's leftovers
    (engine.index.gc.sweep_temporaries) from a live one's."""
    return f"tmp-{os.getpid()}@{socket.gethostname().replace('-', '_')}-"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace `path` by `data` atomically and durably: write a temporary, fsync, rename, fsync the folder."""
    tmp = path.with_name(f".{temp_tag()}{path.name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_array(path: Path, array: np.ndarray) -> None:
    """Write a .npy file under a fresh name and fsync it (removed again if that fails)."""
    try:
        with open(path, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
