"""How fast an exported encoder runs on this machine: the figure `--precision auto` chooses by.

The workload is one indexing batch (8 images) plus one batch of 8 typical queries (8 tokens each); each tower's
best of a few timed calls after a warm-up is kept, the least disturbed by other work on the machine.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

from engine.backends import Encoder
from engine.preprocess import Tokenizer

QUERY_CHARACTERS = 6  # + [CLS] and [SEP] = 8 tokens, a typical search query


@dataclass(frozen=True)
class Speed:
    """Best seconds per call of each tower on the workload, and their sum (the selection key)."""

    vision_s: float
    text_s: float
    images: int
    queries: int

    @property
    def seconds(self) -> float:
        return self.vision_s + self.text_s

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds": self.seconds}


def query_token_ids(context_length: int, count: int = 8, seed: int = 0) -> torch.Tensor:
    """`count` random Chinese queries of QUERY_CHARACTERS characters, tokenised."""
    rng = np.random.default_rng(seed)
    texts = ["".join(chr(int(c)) for c in rng.integers(0x4E00, 0x9FA5, QUERY_CHARACTERS)) for _ in range(count)]
    return Tokenizer(context_length)(texts).ids


def best_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Fastest wall time of fn() in seconds over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_speed(encoder: Encoder, pixels: torch.Tensor, token_ids: torch.Tensor, repeats: int = 3) -> Speed:
    """Time `encoder` on `pixels` (one batch) and `token_ids` (one batch)."""
    return Speed(best_time(lambda: encoder.encode_images(pixels), repeats),
                 best_time(lambda: encoder.encode_texts(token_ids), repeats), len(pixels), len(token_ids))
