"""Benchmarks of the pipeline against a plain NumPy reference (see benchmarks/README.md)."""
