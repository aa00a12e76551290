"""engine.batcher: grouping, per-caller results, bounded queue, timeouts, errors and draining on close."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from engine.batcher import Batcher, BatcherClosed, BatcherConfig, QueueFull, Timeout
from engine.errors import InputError


def run(coro):
    return asyncio.run(coro)


class Recorder:
    """A batch function that squares items, records batch sizes and can be slowed down or made to fail."""

    def __init__(self, delay_s: float = 0.0, fail_on: int | None = None) -> None:
        self.sizes: list[int] = []
        self.items: list[int] = []
        self.threads: set[int] = set()
        self.delay_s = delay_s
        self.fail_on = fail_on

    def __call__(self, items: list[int]) -> list[int]:
        self.sizes.append(len(items))
        self.items.extend(items)
        self.threads.add(threading.get_ident())
        time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [x * x for x in items]


def test_concurrent_callers_are_batched_and_get_their_own_results():
    fn = Recorder(delay_s=0.01)
    seen: list[int] = []

    async def main():
        b = Batcher("t", fn, BatcherConfig(max_batch_size=8, max_delay_ms=20), on_batch=lambda n, s: seen.append(n))
        b.start()
        out = await asyncio.gather(*(b.submit(i) for i in range(50)))
        await b.close()
        return out

    assert run(main()) == [i * i for i in range(50)]
    assert sum(fn.sizes) == 50 and max(fn.sizes) == 8 and max(fn.sizes) > 1
    assert seen == fn.sizes
    assert threading.main_thread().ident not in fn.threads  # the batch runs off the event loop thread


def test_submit_many_keeps_order_and_lone_item_waits_at_most_the_delay():
    fn = Recorder()

    async def main():
        b = Batcher("t", fn, BatcherConfig(max_batch_size=4, max_delay_ms=30))
        b.start()
        many = await b.submit_many([3, 1, 2, 5, 4, 6])
        t0 = time.monotonic()
        one = await b.submit(7)
        waited = time.monotonic() - t0
        await b.close()
        return many, one, waited

    many, one, waited = run(main())
    assert many == [9, 1, 4, 25, 16, 36] and one == 49
    assert 0.02 <= waited < 2.0


def test_full_queue_refuses_at_once_with_retry_after():
    fn = Recorder(delay_s=0.2)

    async def main():
        b = Batcher("t", fn, BatcherConfig(max_batch_size=1, max_delay_ms=0, max_queue=2))
        b.start()
        first = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.05)  # 1 is running; 2 and 3 fill the queue
        queued = [asyncio.ensure_future(b.submit(i)) for i in (2, 3)]
        await asyncio.sleep(0)
        assert b.queue_depth == 2
        with pytest.raises(QueueFull) as info:
            await b.submit(4)
        with pytest.raises(InputError, match="exceed"):
            await b.submit_many(list(range(3)))
        results = await asyncio.gather(first, *queued)
        await b.close()
        return info.value, results

    refused, results = run(main())
    assert refused.retry_after_s >= 1 and "full" in str(refused)
    assert results == [1, 4, 9]


def test_timeout_abandons_item_and_later_items_still_work():
    fn = Recorder(delay_s=0.15)

    async def main():
        b = Batcher("t", fn, BatcherConfig(max_batch_size=1, max_delay_ms=0, timeout_s=0.1))
        b.start()
        slow = asyncio.ensure_future(b.submit(1))
        waiting = asyncio.ensure_future(b.submit(2))  # queued behind 1: times out before it starts
        with pytest.raises(Timeout):
            await slow
        with pytest.raises(Timeout):
            await waiting
        b.config = BatcherConfig(max_batch_size=1, max_delay_ms=0, timeout_s=5)
        after = await b.submit(3)
        await b.close()
        return after

    assert run(main()) == 9
    assert fn.items == [1, 3]  # the abandoned item 2 never reached the tower


def test_batch_error_reaches_only_that_batch():
    fn = Recorder(fail_on=13)

    async def main():
        b = Batcher("t", fn, BatcherConfig(max_batch_size=2, max_delay_ms=50))
        b.start()
        bad = asyncio.gather(b.submit(12), b.submit(13), return_exceptions=True)
        results = await bad
        good = await b.submit(4)
        await b.close()
        return results, good

    results, good = run(main())
    assert all(isinstance(r, ValueError) and "13" in str(r) for r in results)
    assert good == 16


def test_close_drains_queue_then_refuses():
    fn = Recorder(delay_s=0.02)

    async def main():
        b = Batcher("t", fn, BatcherConfig(max_batch_size=2, max_delay_ms=0))
        b.start()
        pending = [asyncio.ensure_future(b.submit(i)) for i in range(6)]
        await asyncio.sleep(0)
        await b.close()
        with pytest.raises(BatcherClosed):
            await b.submit(1)
        return await asyncio.gather(*pending)

    assert run(main()) == [i * i for i in range(6)]


@pytest.mark.parametrize("kwargs", [{"max_batch_size": 0}, {"max_delay_ms": -1}, {"max_queue": 0},
                                    {"timeout_s": 0}, {"max_batch_size": 2.5}])
def test_config_rejects_bad_values(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(InputError, match=name):
        BatcherConfig(**kwargs)
