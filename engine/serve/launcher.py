"""Start `python -m engine.serve` as a child process on a free loopback port and wait until it is ready.

Used by the server tests and the serving benchmark, and handy for scripts that need a throw-away server.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One server subprocess writing to `log`; `env` entries override (None removes) the inherited environment."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str | None] | None = None,
                 cwd: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for key, value in (env or {}).items():
            if value is None:
                environment.pop(key, None)
            else:
                environment[key] = value
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "engine.serve", "--port", str(self.port), "--log-level", "warning", *args],
                cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=environment)

    def wait_ready(self, timeout: float = 90.0, poll_s: float = 0.2) -> dict:
        """The /readyz body once it answers 200; RuntimeError with the log's tail if the server dies or stalls."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self._tail()}")
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=5)
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            time.sleep(poll_s)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self._tail()}")

    @contextmanager
    def serving(self, stop_signal: int = signal.SIGKILL) -> Iterator["ServerProcess"]:
        """This server once ready (`wait_ready`); stopped with `stop_signal` when the block ends, however it ends."""
        try:
            self.wait_ready()
            yield self
        finally:
            self.stop(stop_signal)

    def alive(self) -> bool:
        """Whether the process runs and /healthz answers 200."""
        return self.proc.poll() is None and httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send `sig` (SIGTERM: graceful) and wait; kill after `timeout`. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def _tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"
