"""Benchmarks for fedloom (run as scripts; see benchmarks/README.md)."""
