"""benchmarks.towers_interleaved: the ratios are against the reference's own best and median rounds (the rotation
itself is engine.backends.candidate_timing's, tested in test_candidate_timing.py)."""
from __future__ import annotations

import pytest

from benchmarks.towers_interleaved import ratios, table


def test_ratios_use_the_reference_rounds():
    samples = {"torch-fp32": [10.0, 12.0, 30.0], "fast": [2.0, 3.0, 9.0], "slow": [20.0, 24.0, 25.0]}
    got = ratios(samples)
    assert got["torch-fp32"].best_ratio == got["torch-fp32"].median_ratio == 1.0
    assert (got["fast"].best_s, got["fast"].median_s) == (2.0, 3.0)
    assert (got["fast"].best_ratio, got["fast"].median_ratio) == (5.0, 4.0)
    assert (got["slow"].best_ratio, got["slow"].median_ratio) == (0.5, 0.5)
    with pytest.raises(ValueError, match="reference"):
        ratios({"fast": [1.0]})
    text = table(got, {"fast": (0.9991, 0.99)}, "title")
    assert "| fast | 2000.00 | 3000.00 | 5.00x | 4.00x | 0.999100 (0.99) |" in text
    assert "| torch-fp32 | 10000.00 | 12000.00 | 1.00x | 1.00x | reference |" in text
    assert "| slow |" in text and text.endswith("|\n")
