"""pytest plugin (`-p benchmarks.partial`, added by the runner): append each finished benchmark case and each skip to
$BENCH_PARTIAL as JSON lines, so a subject stopped at its time limit keeps what it measured (pytest-benchmark writes
its own JSON only when the session ends)."""
from __future__ import annotations

import json
import os

import pytest

PARTIAL_ENV = "BENCH_PARTIAL"


def _append(record: dict) -> None:
    path = os.environ.get(PARTIAL_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """After a benchmark case runs, record it in pytest-benchmark's JSON shape (stats: min, median, rounds)."""
    yield
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    metadata = getattr(fixture, "stats", None)
    if metadata is None or not metadata.stats.data:
        return
    stats = metadata.stats
    _append({"kind": "benchmark", "name": item.name, "group": fixture.group, "params": fixture.params,
             "extra_info": fixture.extra_info, "stats": {"min": stats.min, "median": stats.median,
                                                         "rounds": stats.rounds}})


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Record a skipped case with its reason."""
    if report.skipped and isinstance(report.longrepr, tuple):
        _append({"kind": "skipped", "test": report.nodeid.rsplit("::", 1)[-1],
                 "reason": str(report.longrepr[2]).removeprefix("Skipped: ")})
