"""Benchmarks (pytest-benchmark): run with `python -m pytest benchmarks/<file> --benchmark-only`."""
