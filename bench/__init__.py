"""Benchmarks of the README's measurements; run each from the repository root: ``python -m bench.<name>``."""
