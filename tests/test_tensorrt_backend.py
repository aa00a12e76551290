"""TensorRT runner thread safety, on the CPU with a fake execution context (no TensorRT or GPU needed).

A TensorRT execution context holds per-call state (input shape, tensor addresses): the fake records any call
sequence that another thread interleaves, and computes its output from the bound addresses, so an unguarded
context gives wrong rows as well as recorded overlaps.
"""
from __future__ import annotations

import ctypes
import threading
import time

import numpy as np
import pytest
import torch

from engine.backends.tensorrt_backend import ContextRunner
from engine.errors import InputError

STREAM = 0x5EED  # the runner's own stream handle (0 would be the legacy default stream)
WIDTH = 6


class FakeContext:
    """The IExecutionContext calls the runner makes; output row b = [sum(x_b) + j for j in 0..2].

    A call sequence (set_input_shape ... execute_async_v3) that another thread's calls interleave is counted in
    `overlaps` and its execute fails without touching memory (a real context would compute garbage or crash).
    """

    def __init__(self, max_batch: int = 8) -> None:
        self.max_batch = max_batch
        self.shape: tuple | None = None
        self.addresses: dict[str, int] = {}
        self.owner: int | None = None  # thread inside a set_input_shape ... execute sequence
        self.clean = True  # no other thread's call since the owner's set_input_shape
        self.overlaps = 0
        self.streams: set[int] = set()
        self._bookkeeping = threading.Lock()  # makes each fake method atomic; sequences are what is tested

    def _step(self, first: bool = False) -> None:
        me = threading.get_ident()
        if (first and self.owner is not None) or (not first and self.owner != me):
            self.overlaps += 1
            self.clean = False
        elif first:
            self.clean = True
        if first:
            self.owner = me

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        with self._bookkeeping:
            self._step(first=True)
            if not 1 <= shape[0] <= self.max_batch:
                self.owner = None
                return False
            self.shape = tuple(shape)
        time.sleep(0.0005)  # widen the window another thread could interleave in
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        with self._bookkeeping:
            self._step()
            return (self.shape[0], 3)

    def set_tensor_address(self, name: str, address: int) -> None:
        with self._bookkeeping:
            self._step()
            self.addresses[name] = address
        time.sleep(0.0005)

    def execute_async_v3(self, stream: int) -> bool:
        with self._bookkeeping:
            self._step()
            self.streams.add(stream)
            ok, self.owner = self.clean and self.owner == threading.get_ident(), None
            if not ok:
                return False
            b, w = self.shape
            x = np.ctypeslib.as_array((ctypes.c_float * (b * w)).from_address(self.addresses["x"])).reshape(b, w)
            out = np.ctypeslib.as_array((ctypes.c_float * (b * 3)).from_address(self.addresses["y"])).reshape(b, 3)
            out[:] = x.sum(axis=1, keepdims=True) + np.arange(3, dtype=np.float32)
            return True


def make_runner(context: FakeContext) -> ContextRunner:
    return ContextRunner(context, "x", "y", torch.float32, device=torch.device("cpu"), stream_handle=STREAM,
                         profile=((1, WIDTH), (context.max_batch, WIDTH)))


def expected(x: torch.Tensor) -> torch.Tensor:
    return x.sum(dim=1, keepdim=True) + torch.arange(3, dtype=torch.float32)


def hammer(call, threads: int = 6, calls: int = 15) -> list[str]:
    """Run `call(x)` from several threads on distinct inputs; returns the mismatches seen."""
    errors: list[str] = []

    def worker(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for i in range(calls):
            x = torch.randn(1 + (seed + i) % 8, WIDTH, generator=gen)
            try:
                out = call(x)
            except Exception as exc:  # noqa: BLE001 - a fake context raising mid-race is a failure to report
                errors.append(f"thread {seed} call {i}: {exc!r}")
                continue
            if out.shape != (len(x), 3) or not torch.allclose(out, expected(x)):
                errors.append(f"thread {seed} call {i}: wrong output")

    pool = [threading.Thread(target=worker, args=(seed,)) for seed in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return errors


def test_context_runner_serialises_threads_on_its_own_stream() -> None:
    context = FakeContext()
    runner = make_runner(context)
    assert hammer(lambda x: runner.run(x.contiguous())) == []
    assert context.overlaps == 0
    assert context.streams == {STREAM}


def test_fake_context_detects_unguarded_use() -> None:
    """Control: the same workload straight on the context (no lock) is caught, so the test above means something."""
    context = FakeContext()

    def unguarded(x: torch.Tensor) -> torch.Tensor:
        context.set_input_shape("x", tuple(x.shape))
        out = torch.empty(len(x), 3)
        context.set_tensor_address("x", x.data_ptr())
        context.set_tensor_address("y", out.data_ptr())
        if not context.execute_async_v3(STREAM):
            raise RuntimeError("interleaved")
        return out

    hammer(unguarded, calls=5)
    assert context.overlaps > 0


def test_shape_outside_profile_raises_and_releases_the_lock() -> None:
    context = FakeContext(max_batch=4)
    runner = make_runner(context)
    with pytest.raises(InputError, match="outside the engine's profile"):
        runner.run(torch.zeros(5, WIDTH))
    x = torch.ones(2, WIDTH)
    torch.testing.assert_close(runner.run(x), expected(x))
