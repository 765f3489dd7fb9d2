"""Benchmark suites of spinenet-fast: ``python -m benchmarks.run`` (see benchmarks/README.md)."""
