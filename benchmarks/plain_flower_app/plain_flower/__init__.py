"""Plain-Flower baseline app for ``benchmarks/round_overhead.py`` (kept import-free)."""
