"""Timing shared by the benchmarks: models take turns run by run, so the machine's noise falls on all alike."""

from __future__ import annotations

import statistics
import time

import numpy as np


def interleaved(runs: dict, feed: np.ndarray, count: int, warmups: int = 10, rotate: bool = False) -> dict:
    """Median ms of each run(feed) in `runs`, all of them taking turns run by run; with `rotate`, each round
    starts one model later, so that whatever falls on a place in the round falls on every model alike."""
    times = {key: [] for key in runs}
    order = list(runs.items())
    for i in range(warmups + count):
        shift = i % len(order) if rotate else 0
        for key, run in order[shift:] + order[:shift]:
            start = time.perf_counter()
            run(feed)
            if i >= warmups:
                times[key].append((time.perf_counter() - start) * 1e3)
    return {key: statistics.median(t) for key, t in times.items()}
