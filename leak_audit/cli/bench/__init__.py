"""Benchmarks run from the ``leak-audit bench`` command line.

* :mod:`leak_audit.cli.bench.text`: per-attack leakage (ROUGE, token recall, exact match) and seconds per
  batch on real sentences, for several tapped views and batch sizes (``leak-audit bench text``).
"""

__all__: list[str] = []
