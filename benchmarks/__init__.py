"""Benchmarks: measurements, not tests (see ENGINE.md and README.md)."""
