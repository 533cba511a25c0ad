"""Benchmark modules run by scripts/bench.py; each exposes run(ctx) -> list of result rows."""
