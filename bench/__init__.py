"""Benchmarks and the trainer of the built-in toy model (run from the repository root)."""
