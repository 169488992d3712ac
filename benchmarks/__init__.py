"""Benchmarks: our pipeline against an official-style baseline, in the same run (see README.md)."""
