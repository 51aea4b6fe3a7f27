"""Chaos: the worker fleet under kills, database restarts, cut connections and misbehaving receivers.

`pytest tests/chaos` runs the short CI scenario; `scripts/chaos` (or `python -m tests.chaos`)
runs the same code with bigger numbers.
"""
