"""The query workload `--precision auto` times the text tower on (the timing itself and the choice are
engine.backends.auto_precision's): a typical search query of 8 tokens.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from engine.backends.candidate_timing import time_samples
from engine.preprocess import Tokenizer

QUERY_CHARACTERS = 6  # + [CLS] and [SEP] = 8 tokens, a typical search query


def query_token_ids(context_length: int, count: int = 8, seed: int = 0) -> torch.Tensor:
    """`count` random Chinese queries of QUERY_CHARACTERS characters, tokenised."""
    rng = np.random.default_rng(seed)
    texts = ["".join(chr(int(c)) for c in rng.integers(0x4E00, 0x9FA5, QUERY_CHARACTERS)) for _ in range(count)]
    return Tokenizer(context_length)(texts).ids


def best_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Fastest wall time of fn() in seconds over `repeats` runs after `warmup` runs."""
    return min(time_samples(fn, repeats, warmup))
