"""Image decoding in worker processes, under a time budget: a decode that has used `timeout_s` of CPU time (or
WALL_FACTOR times that in wall time, when a busy machine starves it) is killed, its worker replaced, and refused
with an ImageDecodeError naming the input. A decompression bomb (a progressive JPEG of thousands of scans, say)
so costs at most the budget of one core and never stalls other requests; the workers also run at a lower
priority (nice 5), so searches and encodes take the CPU first.

Workers are forked from a forkserver (engine.preprocess preloaded once), run `load_image` (the one decoding rule,
pixel limit included) and send back the decoded image: mode, size and palette, then its raw bytes, which the
parent wraps without another copy. `PixelGate` bounds the decoded pixels the parent holds at once."""
from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import queue
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from .errors import ImageDecodeError, InputError
from .preprocess import ImageInput, load_image

DECODE_NICENESS = 5  # decoding processes run below the server's priority
WALL_FACTOR = 1.25  # a decode starved by a busy machine may take this many times its CPU budget in wall time
_POLL_S = 0.05
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class DecodeBudget:
    """How images are decoded: in `workers` processes, each decode allowed `timeout_s` seconds of CPU time (and at
    most WALL_FACTOR times that in wall time)."""

    timeout_s: float = 2.0
    workers: int = 2

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise InputError(f"the decode timeout must be > 0 seconds, got {self.timeout_s!r}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise InputError(f"decode workers must be an int >= 1, got {self.workers!r}")


class PixelGate:
    """At most `capacity` decoded pixels held at once; one image larger than the capacity still passes alone."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self._cond = threading.Condition()

    def acquire(self, pixels: int) -> int:
        with self._cond:
            self._cond.wait_for(lambda: self.held == 0 or self.held + pixels <= self.capacity)
            self.held += pixels
        return pixels

    def release(self, pixels: int) -> None:
        with self._cond:
            self.held -= pixels
            self._cond.notify_all()


class _Worker:
    """One decoding process and the parent's end of its pipe."""

    def __init__(self, context: Any, max_pixels: int) -> None:
        self.conn, child = multiprocessing.Pipe()
        self.process = context.Process(target=serve_decodes, args=(child, max_pixels), daemon=True,
                                       name="image-decode")
        self.process.start()
        child.close()

    def cpu_seconds(self) -> float | None:
        """CPU time the process has used (user + system), from /proc; None where there is no /proc."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / _TICKS

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class DecodePool:
    """`decode(source, name)`: `load_image` in a worker process, refused past the budget (see the module)."""

    def __init__(self, budget: DecodeBudget, max_pixels: int) -> None:
        self.budget, self.max_pixels = budget, max_pixels
        self._context = multiprocessing.get_context("forkserver")  # workers fork from a clean, preloaded process
        self._context.set_forkserver_preload(["engine.preprocess"])
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        for _ in range(budget.workers):
            self._add_worker()

    def _add_worker(self) -> None:
        worker = _Worker(self._context, self.max_pixels)
        with self._lock:
            self._all.add(worker)
        self._idle.put(worker)

    def decode(self, source: ImageInput, name: str, gate: PixelGate | None = None) -> tuple[Image.Image, int]:
        """(the decoded image, the pixels it holds in `gate`, to release when done with it). Paths and bytes go
        to a worker; a PIL image is only checked and loaded here."""
        if isinstance(source, Image.Image):
            image = load_image(source, self.max_pixels)
            return image, gate.acquire(image.width * image.height) if gate is not None else 0
        with self._worker(name) as worker:
            worker.conn.send(("decode", _message(source)))
            _, mode, size, palette = self._answer(worker, name)
            pixels = gate.acquire(size[0] * size[1]) if gate is not None else 0
            try:
                data = worker.conn.recv_bytes()
            except BaseException:
                if gate is not None:
                    gate.release(pixels)
                raise
        image = Image.frombuffer(mode, size, data, "raw", mode, 0, 1)
        if palette is not None:
            image.putpalette(palette)
        return image, pixels

    def size(self, source: ImageInput, name: str) -> tuple[int, int]:
        """(width, height) from the image's header alone, in a worker under the same budget."""
        if isinstance(source, Image.Image):
            return source.size
        with self._worker(name) as worker:
            worker.conn.send(("size", _message(source)))
            return self._answer(worker, name)[1]

    @contextlib.contextmanager
    def _worker(self, name: str) -> Iterator[_Worker]:
        """An idle worker for one request; one that overran its budget or failed is replaced."""
        if self._closed:
            raise RuntimeError("the decode pool is closed")
        worker = self._idle.get()
        try:
            yield worker
        except ImageDecodeError:  # the worker answered with the error: its pipe is clean
            self._idle.put(worker)
            raise
        except _Overrun:
            self._replace(worker)
            raise ImageDecodeError(f"{name}: decoding took longer than the budget of {self.budget.timeout_s:g} s "
                                   "(--decode-timeout-s): refused (a decompression bomb?)") from None
        except (EOFError, OSError) as exc:
            self._replace(worker)
            raise ImageDecodeError(f"{name}: the decoding process failed ({exc.__class__.__name__})") from exc
        except BaseException:
            self._replace(worker)  # the pipe may hold an unread answer
            raise
        self._idle.put(worker)

    def _answer(self, worker: _Worker, name: str) -> tuple:
        """The worker's first answer; _Overrun once the decode has used the budget in CPU time, or
        WALL_FACTOR times it in wall time (a decode starved by a busy machine is not a bomb)."""
        started, cpu_before = time.monotonic(), worker.cpu_seconds()
        while not worker.conn.poll(_POLL_S):
            wall = time.monotonic() - started
            cpu = worker.cpu_seconds() - cpu_before if cpu_before is not None else wall
            if cpu >= self.budget.timeout_s or wall >= WALL_FACTOR * self.budget.timeout_s:
                raise _Overrun()
        head = worker.conn.recv()
        if head[0] == "error":
            raise ImageDecodeError(f"{name}: {head[1]}")
        return head

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._all.discard(worker)
        if not self._closed:
            self._add_worker()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            workers, self._all = list(self._all), set()
        for worker in workers:
            worker.kill()


class _Overrun(Exception):
    """A decode ran past its budget."""


def serve_decodes(conn: Connection, max_pixels: int) -> None:
    """A worker's loop: decode each source received, answer (mode, size, palette) then the raw pixels, or an error."""
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own bomb guard follows the limit here too
    os.nice(DECODE_NICENESS)  # searches and encodes come first; a bomb only gets what they leave
    while True:
        try:
            op, source = conn.recv()
        except EOFError:
            return
        try:
            if op == "size":
                conn.send(("size", Image.open(io.BytesIO(source) if isinstance(source, bytes) else source).size))
                continue
            image = load_image(source, max_pixels)
            palette = image.getpalette() if image.mode == "P" else None
            data = image.tobytes()
        except ImageDecodeError as exc:
            conn.send(("error", _without_prefix(str(exc))))
            continue
        except Exception as exc:  # Pillow raises many kinds for damaged data
            conn.send(("error", f"cannot decode image ({exc.__class__.__name__}: {exc})"))
            continue
        conn.send(("image", image.mode, image.size, palette))
        del image
        conn.send_bytes(data)


def _message(source: ImageInput) -> str | bytes:
    """What a worker is sent: a path as text, or the bytes."""
    return str(source) if isinstance(source, (str, Path)) else bytes(source)


def _without_prefix(message: str) -> str:
    """load_image's message without its leading `<N bytes>: ` or path (the parent names the input itself)."""
    head, sep, rest = message.partition(": ")
    return rest if sep else message
