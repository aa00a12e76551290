"""Driver-side progress for an indexing job: a bar with images/s on a terminal, a line every N images
otherwise, and a one-line summary at the end."""
from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


class Progress:
    """Counts images done (encoded, or reported bad) against `total`; shows it from the first image."""

    def __init__(self, total: int, *, enabled: bool = True, every: int = 1000, stream: TextIO | None = None) -> None:
        self.total = total
        self.done = 0
        self.every = max(1, every)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.started = time.perf_counter()
        self._next_line = self.every
        terminal = self.stream.isatty() if hasattr(self.stream, "isatty") else False
        self._bar = tqdm(total=total, unit="img", desc="indexing", file=self.stream, dynamic_ncols=True,
                         disable=not (enabled and terminal))
        if enabled and not terminal:
            self._line(f"indexing {total} images")

    @property
    def rate(self) -> float:
        """Images per second since the job started."""
        elapsed = time.perf_counter() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def update(self, count: int) -> None:
        self.done += count
        if not self._bar.disable:
            self._bar.update(count)
            return
        while self.enabled and self.done >= self._next_line:
            self._line(f"{self.done}/{self.total} images ({self.rate:.1f} images/s)")
            self._next_line += self.every

    def close(self, summary: str) -> None:
        """Close the bar and print `summary` (the caller's sentence, images/s appended)."""
        self._bar.close()
        if self.enabled:
            elapsed = time.perf_counter() - self.started
            self._line(f"{summary} in {elapsed:.1f} s ({self.rate:.1f} images/s)")

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
