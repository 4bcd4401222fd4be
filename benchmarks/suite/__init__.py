"""Scaling suites: round time, bytes, ratios, expansion and peak memory (``make bench``).

The files ``bench_*.py`` here are pytest-benchmark suites; ``conftest.py`` collects them,
records one row per measurement and, when the session ends, has ``benchmarks/report.py``
rewrite its own sections of ``benchmarks/RESULTS.md`` and the plots in ``benchmarks/plots/``.
See ``docs/benchmarks.md``.
"""
