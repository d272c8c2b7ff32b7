"""Helpers shipped with the package for tests and benchmarks: fake clock, real processes."""
