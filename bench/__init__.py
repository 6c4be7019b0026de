"""Benchmarks that print measured figures beside DESIGN.md's targets (see bench/README.md)."""
