"""Timing a model here: one loop for `evc bench`, latency tables and evaluations alike.

    run = fmt.session(path, thread_count("all"))
    measure(run, feed, runs=50, warmups=5)             # median, p90, throughput
    interleaved({"a": run_a, "b": run_b}, feed, 50, 5)  # medians, timed taking turns
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np


def thread_count(value) -> int:
    """A target's `threads` entry as a count: `all` is the cores this process may run on."""
    return len(os.sched_getaffinity(0)) if value == "all" else int(value)


def timed(run, feed: np.ndarray, runs: int) -> list[float]:
    """The ms of each of `runs` calls of run(feed)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(feed)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure(run, feed: np.ndarray, runs: int, warmups: int) -> dict:
    """Median and p90 ms of run(feed) after `warmups` untimed calls, and images per second at the median."""
    for _ in range(warmups):
        run(feed)
    times = sorted(timed(run, feed, runs))
    median = statistics.median(times)
    return {"median_ms": median, "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
            "throughput_per_s": len(feed) * 1e3 / median}


def interleaved(runs: dict, feed: np.ndarray, count: int, warmups: int) -> dict:
    """Median ms of each run(feed), all taking turns run by run, so the machine's noise falls on all alike;
    the turns' order is shuffled (seeded) each round, so that noise with a period cannot fall on one alone."""
    for _ in range(warmups):
        for run in runs.values():
            run(feed)
    keys, order = list(runs), np.random.default_rng(0)
    times = {key: [] for key in keys}
    for _ in range(count):
        for i in order.permutation(len(keys)):
            times[keys[i]] += timed(runs[keys[i]], feed, 1)
    return {key: statistics.median(t) for key, t in times.items()}
