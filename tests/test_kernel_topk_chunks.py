"""The CUDA top-k's chunk planner and chunk-and-merge driver (csrc/topk_chunks.*), run on the CPU.

The planner must keep the chunk buffers within the budget for any Q (the old fixed 1024-column floor needed
Q x 1024 floats, over the 16M-float budget past Q = 16384); the driver must give exactly the stable descending
sort's top-k (ties to the lower index) whatever the chunking.
"""
from __future__ import annotations

import pytest
import torch

from engine import ops

pytestmark = pytest.mark.skipif(not ops.extension_available(),
                                reason="engine._laclip_ext not built (pip install --no-build-isolation -e .)")


def footprint(q: int, n: int, k: int) -> int:
    """Bytes the driver holds for a chunk (csrc/topk_chunks.cpp chunk_footprint): keys and torch.topk's scratch
    (10 bytes a key) plus <= 8 k-lists per query."""
    return q * (10 * n + 64 * k)


@pytest.mark.parametrize("n", [1, 100, 1024, 100_000, 10_000_000])
@pytest.mark.parametrize("q", [1, 7, 64, 16_384, 16_385, 100_000, 10_000_000, 10**9])
def test_plan_stays_within_budget_for_any_q(q: int, n: int) -> None:
    ext = ops.extension()
    budget, min_columns = ext.topk_limits()
    for k in sorted({k for k in (1, 10, 1000, n) if k <= n}):
        q_chunk, n_chunk, peak = ext.plan_topk_chunks(q, n, k)
        assert 1 <= q_chunk <= q and min(n, min_columns) <= n_chunk <= n
        assert peak == footprint(q_chunk, n_chunk, k)
        one_query = footprint(1, min(n, min_columns), k)
        assert peak <= max(budget, one_query), (q, n, k, q_chunk, n_chunk, peak)


def test_plan_uses_the_budget() -> None:
    """Small problems run in one chunk; wide ones take as many columns as the budget gives every query."""
    ext = ops.extension()
    assert ext.plan_topk_chunks(64, 100_000, 10)[:2] == (64, 100_000)
    q_chunk, n_chunk, peak = ext.plan_topk_chunks(64, 10_000_000, 10)
    assert q_chunk == 64 and 100_000 < n_chunk < 10_000_000 and peak > ext.topk_limits()[0] // 2
    q_chunk, n_chunk, _ = ext.plan_topk_chunks(1_000_000, 100_000, 10)
    assert n_chunk == ext.topk_limits()[1] and q_chunk < 1_000_000


def test_plan_with_k_too_large_for_the_budget_goes_one_query_at_a_time() -> None:
    ext = ops.extension()
    q_chunk, n_chunk, peak = ext.plan_topk_chunks(50, 10_000_000, 2_000_000)
    assert q_chunk == 1 and peak == footprint(1, n_chunk, 2_000_000)


def tied_scores(q: int, n: int, seed: int) -> torch.Tensor:
    """Scores with many exact ties, negative values and both zeros."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(-4, 5, (q, n), generator=gen).float() / 4
    scores[(scores == 0) & (torch.arange(n) % 2 == 0)] = -0.0
    scores[:, ::7] += torch.randn(q, (n + 6) // 7, generator=gen)
    return scores


@pytest.mark.parametrize("chunks", [(1, 1), (2, 3), (3, 64), (5, 1000), (100, 7)], ids=lambda c: "{}x{}".format(*c))
@pytest.mark.parametrize("k", [1, 4, 50, 97])
def test_chunked_topk_equals_stable_sort(chunks: tuple[int, int], k: int) -> None:
    scores = tied_scores(9, 97, seed=k)
    values, indices = ops.extension().chunked_topk_of_scores(scores, k, *chunks)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(indices, order)
    assert torch.equal(values, scores.gather(1, order))
    assert values.dtype == torch.float32 and indices.dtype == torch.int64


@pytest.mark.cuda
@pytest.mark.skipif(not ops.cuda_available(), reason="needs a CUDA GPU and a CUDA build of engine._laclip_ext")
@pytest.mark.parametrize("weights", ["image", "text"])
def test_cuda_topk_past_the_old_query_limit(weights: str) -> None:
    """Q = 20000 (> 16384) runs in several query chunks and matches the CPU kernel's top-k within its buffer budget."""
    gen = torch.Generator().manual_seed(1)
    t, g, c = torch.randn(20_000, 64, generator=gen), torch.randn(3000, 64, generator=gen), torch.randn(3000, 2, 64,
                                                                                                     generator=gen)
    t, g, c = (x / x.norm(dim=-1, keepdim=True) for x in (t, g, c))
    assert ops.extension().plan_topk_chunks(20_000, 3000, 5)[0] < 20_000
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    values, indices = ops.laclip_topk(t.cuda(), g.cuda(), c.cuda(), k=5, alpha=0.5, tau=0.1, weights=weights)
    inputs = sum(x.numel() * 4 for x in (t, g, c)) * 2  # inputs and their fp32 copy of T, generously
    assert torch.cuda.max_memory_allocated() - before <= ops.extension().topk_limits()[0] + inputs + 20_000 * 5 * 12
    cpu_values, _ = ops.laclip_topk(t, g, c, k=5, alpha=0.5, tau=0.1, weights=weights)
    torch.testing.assert_close(values.cpu(), cpu_values, atol=1e-5, rtol=1e-5)
