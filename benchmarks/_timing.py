"""Timing shared by the benchmarks: models take turns run by run, so the machine's noise falls on all alike."""

from __future__ import annotations

import statistics
import time

import numpy as np


def interleaved(runs: dict, feed: np.ndarray, count: int, warmups: int = 10) -> dict:
    """Median ms of each run(feed) in `runs`, all of them taking turns run by run."""
    times = {key: [] for key in runs}
    for i in range(warmups + count):
        for key, run in runs.items():
            start = time.perf_counter()
            run(feed)
            if i >= warmups:
                times[key].append((time.perf_counter() - start) * 1e3)
    return {key: statistics.median(t) for key, t in times.items()}
