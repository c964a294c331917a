"""Timing helper shared by the benchmark scripts (run as ``python benchmarks/<name>.py``, so importable by name)."""

from __future__ import annotations

import time
from typing import Any, Callable

__all__ = ["best_process_time"]


def best_process_time(f: Callable[[], Any], repeats: int) -> float:
    """The smallest process CPU time of ``repeats`` calls of ``f`` after one warm-up call (seconds)."""
    f()
    ts = []
    for _ in range(repeats):
        t0 = time.process_time()
        f()
        ts.append(time.process_time() - t0)
    return min(ts)
