#!/usr/bin/env python3
"""Parse the output of ExecuTorch's `executor_runner` into JSON. Standard library only.

It runs on the device's host too (an Android pte bundle carries a copy):

    python3 parse_executor_runner.py executor_runner.log                    # one JSON object
    python3 parse_executor_runner.py --warmups 10 --threads 4 executor_runner.log
    adb shell ... | python3 parse_executor_runner.py -

The runner (examples/portable/executor_runner/executor_runner.cpp) logs through
ExecuTorch's ET_LOG, whose POSIX platform layer writes one line per message
(runtime/platform/default/posix.cpp):

    I 00:00:00.051208 executorch:executor_runner.cpp:507] Model loaded in 47.201000 ms.
    I 00:00:00.063911 executorch:executor_runner.cpp:652] Iteration 1 of 60: 12.652000 ms
    I 00:00:00.752871 executorch:executor_runner.cpp:671] Model executed successfully 60 time(s) in 700.842000 ms.

The last line is printed by every release and says the run finished; the
per-iteration and load lines by recent ones. The runner has no warm-up of its
own, so bench.sh runs it `warmups + runs` times and the first `--warmups`
iterations are left out of the figures; without per-iteration lines the
average is over every execution, warm-ups included, and the JSON says so:

    {"init_ms": 47.201, "first_inference_ms": 12.652, "inference_avg_ms": 11.6052,
     "inference_std_ms": 0.2111, "inference_min_ms": 11.301, "inference_max_ms": 12.014,
     "runs": 50, "executions": 60, "threadpool_threads": 4, "planned_memory_mb": 1.148}
"""

import json
import re
import statistics
import sys

NUMBER = r"(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
EXECUTED = re.compile(r"Model executed successfully (\d+) time\(s\) in " + NUMBER + " ms")
ITERATION = re.compile(r"Iteration (\d+) of (\d+): " + NUMBER + " ms")
LOADED = re.compile(r"Model loaded in " + NUMBER + " ms")
THREADS = re.compile(r"Resetting threadpool with num threads = (\d+)")
PLANNED = re.compile(r"Setting up (?:CPU )?planned buffer \d+, size (\d+)")


def parse(text: str, warmups: int = 0) -> dict:
    """The figures of one executor_runner run, the first `warmups` iterations left out; ValueError if the run
    did not finish."""
    executed = EXECUTED.search(text)
    if executed is None:
        raise ValueError("no 'Model executed successfully' line: executor_runner did not finish (was it built "
                         "with EXECUTORCH_ENABLE_LOGGING=ON?)")
    executions, total = int(executed.group(1)), float(executed.group(2))
    iterations = [float(ms) for _, _, ms in ITERATION.findall(text)]
    result = {}
    if loaded := LOADED.search(text):
        result["init_ms"] = float(loaded.group(1))
    timed = iterations[warmups:]
    if timed:
        result.update(first_inference_ms=iterations[0], inference_avg_ms=round(statistics.fmean(timed), 6),
                      inference_std_ms=round(statistics.pstdev(timed), 6), inference_min_ms=min(timed),
                      inference_max_ms=max(timed), runs=len(timed))
    else:
        result.update(inference_avg_ms=round(total / executions, 6), runs=executions, warmups_included=True)
    result["executions"] = executions
    if threads := THREADS.search(text):
        result["threadpool_threads"] = int(threads.group(1))
    if planned := PLANNED.findall(text):
        result["planned_memory_mb"] = round(sum(map(int, planned)) / 2**20, 6)
    return result


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Parse executor_runner's output into one JSON object.")
    parser.add_argument("log", help="the runner's output, or - for standard input")
    parser.add_argument("--warmups", type=int, default=0, help="leave out the first N iterations")
    parser.add_argument("--threads", type=int, help="record this thread count in the object")
    args = parser.parse_args(argv)
    try:
        text = sys.stdin.read() if args.log == "-" else open(args.log, encoding="utf-8", errors="replace").read()
        result = parse(text, args.warmups)
    except (OSError, ValueError) as e:
        print(f"parse_executor_runner: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"threads": args.threads, **result} if args.threads else result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
