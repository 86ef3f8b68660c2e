"""Benchmark suites: data, model zoos, metrics and baselines, as plain functions (no flows)."""
