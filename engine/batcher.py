"""Dynamic batching for one tower: requests from many callers are grouped and run off the event loop.

Callers `await batcher.submit(item)` (or `submit_many`). A single worker task takes up to `max_batch_size`
queued items, waiting at most `max_delay_ms` after the oldest one arrived for the batch to fill, runs the
batch function in a worker thread, and hands each caller its own result. The queue is bounded: when full,
`submit` raises `QueueFull` at once (a server answers 429 with Retry-After); a caller that waits longer than
`timeout_s` gets `Timeout` (503). Pure engine code: no web framework here.
"""
from __future__ import annotations

import asyncio
import collections
import math
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

from .errors import EngineError, InputError

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatcherConfig:
    """max_batch_size: items per batch call. max_delay_ms: how long the oldest item may wait for company.
    max_queue: items waiting (not yet running) before new ones are refused. timeout_s: a caller's wait limit."""

    max_batch_size: int = 32
    max_delay_ms: float = 5.0
    max_queue: int = 1024
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise InputError(f"max_batch_size must be an int >= 1, got {self.max_batch_size!r}")
        if not self.max_delay_ms >= 0:
            raise InputError(f"max_delay_ms must be >= 0, got {self.max_delay_ms!r}")
        if not isinstance(self.max_queue, int) or self.max_queue < 1:
            raise InputError(f"max_queue must be an int >= 1, got {self.max_queue!r}")
        if not self.timeout_s > 0:
            raise InputError(f"timeout_s must be > 0, got {self.timeout_s!r}")


class QueueFull(EngineError):
    """The batcher's queue is full; retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Timeout(EngineError):
    """A queued item was not answered within the batcher's timeout."""


class BatcherClosed(EngineError):
    """The batcher is shutting down and takes no new items."""


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future
    enqueued: float


class Batcher(Generic[T, R]):
    """Groups items for `batch_fn(items) -> results` (same length, same order); one instance per tower."""

    def __init__(self, name: str, batch_fn: Callable[[list[T]], Sequence[R]], config: BatcherConfig,
                 on_batch: Callable[[int, float], None] | None = None, executor: Executor | None = None) -> None:
        self.name = name
        self.config = config
        self._batch_fn = batch_fn
        self._on_batch = on_batch
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batcher-{name}")
        self._queue: collections.deque[_Pending[T]] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._closing = False
        self._batch_seconds = 0.05  # running mean of one batch call, for Retry-After

    @property
    def queue_depth(self) -> int:
        """Items waiting to be batched (not counting the batch now running)."""
        return len(self._queue)

    def start(self) -> None:
        """Start the worker task on the running event loop."""
        if self._worker is None:
            self._wakeup = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def submit(self, item: T) -> R:
        """The result for `item`; QueueFull, Timeout, or the batch function's exception."""
        return (await self.submit_many([item]))[0]

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        """Results for several items, queued together (all or none): one caller's multi-item request."""
        self.check_capacity(len(items))
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        pending = [_Pending(item, loop.create_future(), now) for item in items]
        self._queue.extend(pending)
        self._wakeup.set()
        futures = [p.future for p in pending]
        try:
            return list(await asyncio.wait_for(asyncio.gather(*futures), self.config.timeout_s))
        except asyncio.TimeoutError:
            raise Timeout(f"no {self.name} result within {self.config.timeout_s:g} s "
                          f"({len(self._queue)} items queued)") from None
        finally:
            for future in futures:  # timed out or the caller went away: the worker skips these
                future.cancel()

    def check_capacity(self, n: int) -> None:
        """Raise now if `n` more items would not be accepted: callers check before costly preprocessing."""
        if self._worker is None:
            raise BatcherClosed(f"batcher {self.name!r} is not started")
        if self._closing:
            raise BatcherClosed(f"batcher {self.name!r} is shutting down")
        if n > self.config.max_queue:
            raise InputError(f"{n} items in one request exceed the {self.name} queue size "
                             f"{self.config.max_queue}; split the request")
        if len(self._queue) + n > self.config.max_queue:
            raise QueueFull(f"{self.name} queue is full ({len(self._queue)} of {self.config.max_queue} waiting)",
                            self.retry_after_s())

    def retry_after_s(self) -> int:
        """Seconds until the current queue has probably drained (at least 1)."""
        batches = math.ceil(max(1, len(self._queue)) / self.config.max_batch_size)
        return max(1, math.ceil(batches * self._batch_seconds))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._wait_to_fill()
            batch = self._take()
            if not batch:
                continue
            started = time.monotonic()
            try:
                results = await loop.run_in_executor(self._executor, self._batch_fn, [p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.name} batch function returned {len(results)} results "
                                       f"for {len(batch)} items")
            except Exception as exc:  # every caller of this batch sees the batch function's error
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            finally:
                elapsed = time.monotonic() - started
                self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
                if self._on_batch is not None:
                    self._on_batch(len(batch), elapsed)
            for p, result in zip(batch, results):
                if not p.future.done():
                    p.future.set_result(result)

    async def _wait_to_fill(self) -> None:
        """Wait until a full batch is queued or the oldest item has waited max_delay_ms."""
        deadline = self._queue[0].enqueued + self.config.max_delay_ms / 1000
        while len(self._queue) < self.config.max_batch_size and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[_Pending[T]]:
        """Up to max_batch_size live items from the head of the queue (abandoned ones are dropped)."""
        batch: list[_Pending[T]] = []
        while self._queue and len(batch) < self.config.max_batch_size:
            pending = self._queue.popleft()
            if not pending.future.done():
                batch.append(pending)
        return batch

    async def close(self) -> None:
        """Refuse new items, finish everything queued, then stop the worker."""
        self._closing = True
        if self._worker is not None:
            self._wakeup.set()
            await self._worker
        if self._own_executor:
            self._executor.shutdown(wait=True)
