"""pytest setup for the benchmarks: collect bench_*.py files, and print the summaries at the end."""
from __future__ import annotations

import sys

import pytest


def pytest_collect_file(file_path, parent):
    """Collect benchmarks/bench_*.py when the folder is given (files named on the command line are collected anyway)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


SUMMARIES = {"benchmarks.bench_laclip_kernel": "LACLIP kernel vs PyTorch reference",
             "benchmarks.bench_towers": "Towers: each precision and the cn_clip peer vs PyTorch reference"}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for name, title in SUMMARIES.items():
        module = sys.modules.get(name)
        text = module.write_summary() if module is not None else ""
        if text:
            terminalreporter.write_sep("=", title)
            terminalreporter.write(text)
            terminalreporter.write_line(f"(written to {module.SUMMARY_PATH})")
