"""Device-resident copies of index columns: uploaded once, in the background, and dropped with their segment.

Searches never wait for an upload: a column that is not resident yet is streamed block by block from the host
copy while a worker thread copies the whole column to the device through a pinned staging buffer on its own
stream. Copies are keyed by the owning object itself (weakly), never by `id()`, so a segment retired by
compaction cannot hand its tensor to a newer segment that reuses its address. A column that did not fit is tried
again once memory is freed (a forget or an eviction) or after `retry_s`. Derived columns (pooled vectors per
tau/alpha) are kept per owner in least-recently-used order, at most `derived_per_owner` of them.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResidencyConfig:
    """reserve: fraction of device memory left free; derived_per_owner: derived columns kept per owner (LRU);
    retry_s: when a column that did not fit is tried again; staging_bytes: the pinned buffer per upload step."""

    reserve: float = 0.2
    derived_per_owner: int = 2
    retry_s: float = 30.0
    staging_bytes: int = 64 << 20


def device_free_bytes(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of `device` (CUDA), or of nothing to fill (CPU: host memory is not managed here)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    return 1 << 62, 1 << 62


class Residency:
    """Resident device copies of columns, per owner object (a segment part, a live segment)."""

    def __init__(self, device: torch.device, config: ResidencyConfig = ResidencyConfig(),
                 free_bytes: Callable[[torch.device], tuple[int, int]] = device_free_bytes) -> None:
        self.device = device
        self.config = config
        self._free_bytes = free_bytes
        self._columns: weakref.WeakKeyDictionary[object, OrderedDict[str, torch.Tensor]] = weakref.WeakKeyDictionary()
        self._pending: weakref.WeakKeyDictionary[object, dict[str, Future]] = weakref.WeakKeyDictionary()
        self._misses: weakref.WeakKeyDictionary[object, dict[str, float]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-upload")

    def get(self, owner: object, column: str) -> torch.Tensor | None:
        """The resident copy, or None (nothing is started: see `request`)."""
        with self._lock:
            columns = self._columns.get(owner)
            if columns is None or column not in columns:
                return None
            columns.move_to_end(column)
            return columns[column]

    def request(self, owner: object, column: str, source: Callable[[], np.ndarray]) -> torch.Tensor | None:
        """The resident copy if there is one; otherwise start its upload in the background (unless one is running
        or it did not fit less than `retry_s` ago) and return None, so the caller streams from the host."""
        with self._lock:
            columns = self._columns.get(owner)
            if columns is not None and column in columns:
                columns.move_to_end(column)
                return columns[column]
            if column in self._pending.get(owner, {}):
                return None
            missed = self._misses.get(owner, {}).get(column)
            if missed is not None and time.monotonic() - missed < self.config.retry_s:
                return None
            ref = weakref.ref(owner)
            self._pending.setdefault(owner, {})[column] = self._uploader.submit(self._upload, ref, column, source)
        return None

    def put(self, owner: object, column: str, tensor: torch.Tensor, derived: bool = False) -> None:
        """Keep `tensor` (already on the device) as `column` of `owner`; derived columns are evicted LRU."""
        with self._lock:
            columns = self._columns.setdefault(owner, OrderedDict())
            columns[column] = tensor
            columns.move_to_end(column)
            if derived:
                extra = [name for name in columns if name.startswith("derived:")]
                for name in extra[:max(0, len(extra) - self.config.derived_per_owner)]:
                    del columns[name]
                    self._misses.clear()  # memory was freed: columns that did not fit may now

    def fits(self, nbytes: int) -> bool:
        """Whether `nbytes` more leave `reserve` of the device free."""
        free, total = self._free_bytes(self.device)
        return nbytes < free - self.config.reserve * total

    def forget(self, owners: list[object]) -> None:
        """Drop the copies of owners no live snapshot uses (their uploads still running are discarded)."""
        with self._lock:
            for owner in owners:
                self._columns.pop(owner, None)
                self._pending.pop(owner, None)
            self._misses.clear()

    def wait(self) -> None:
        """Block until every upload started so far has finished (benchmarks and tests)."""
        with self._lock:
            futures = [f for pending in self._pending.values() for f in pending.values()]
        for future in futures:
            future.result()

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(t.numel() * t.element_size() for cols in self._columns.values() for t in cols.values())

    def _upload(self, ref: weakref.ref, column: str, source: Callable[[], np.ndarray]) -> None:
        try:
            owner = ref()
            if owner is None:
                return
            array = source()
            if not self.fits(array.nbytes):
                with self._lock:
                    self._misses.setdefault(owner, {})[column] = time.monotonic()
                log.info("index column %s (%.1f MB) does not fit on %s: streamed from the host", column,
                         array.nbytes / 1e6, self.device)
                return
            tensor = self._copy(array)
            with self._lock:
                if column in self._pending.get(owner, {}):  # still wanted (not forgotten meanwhile)
                    self._columns.setdefault(owner, OrderedDict())[column] = tensor
        except Exception:  # an upload failing leaves the column streamed; searches stay correct
            log.exception("uploading index column %s to %s failed", column, self.device)
        finally:
            owner = ref()
            if owner is not None:
                with self._lock:
                    self._pending.get(owner, {}).pop(column, None)

    def _copy(self, array: np.ndarray) -> torch.Tensor:
        """`array` on the device, copied in steps through one pinned buffer on a side stream."""
        host = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type != "cuda":
            return host.clone()
        out = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        flat_in, flat_out = host.reshape(-1), out.reshape(-1)
        step = max(1, self.config.staging_bytes // max(1, host.element_size()))
        staging = torch.empty(min(step, flat_in.numel()), dtype=host.dtype, pin_memory=True)
        stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            for start in range(0, flat_in.numel(), step):
                n = min(step, flat_in.numel() - start)
                staging[:n].copy_(flat_in[start:start + n])
                flat_out[start:start + n].copy_(staging[:n], non_blocking=True)
                stream.synchronize()  # the staging buffer is reused by the next step
        return out
