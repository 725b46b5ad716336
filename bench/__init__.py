"""Benchmarks and load tests for bali-zero-bridge (``make bench`` runs ``python -m bench.run``)."""
