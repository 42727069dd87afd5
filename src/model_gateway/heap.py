"""Garbage-collector settings for a gateway process that serves until it is stopped.

Measured under wrk at 32 connections (benchmarks/README.md): with CPython's defaults a full
collection walked every object the imports and the configuration had made (NumPy, SciPy,
pyarrow, pydantic models) and stopped the event loop for up to ~100 ms, which was the whole
of the p99; young collections ran every ~25 requests although almost everything a request
makes is freed by reference counting. Freezing what exists once the gateway has started takes
it out of every later collection, and a larger young threshold lets cycles gather a while
before one runs (the garbage waiting is bounded by that threshold).
"""

from __future__ import annotations

import gc

#: container objects allocated (net) before a young collection; CPython's default is 700
YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Collect once, then freeze the survivors and raise the young threshold. Call when the
    process has finished starting: everything alive then lives as long as the process."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
