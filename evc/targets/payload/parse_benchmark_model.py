#!/usr/bin/env python3
"""Parse the output of TFLite's `benchmark_model` into JSON. Standard library only.

It runs on the device's host too (the Android bundle carries a copy):

    python3 parse_benchmark_model.py benchmark_model.log          # one JSON object
    python3 parse_benchmark_model.py --threads 4 benchmark_model.log   # tagged with the thread count
    adb shell ... | python3 parse_benchmark_model.py -

The tool reports microseconds; the JSON holds milliseconds:

    {"init_ms": 0.847, "first_inference_ms": 57.338, "warmup_avg_ms": 47.6741,
     "warmup_std_ms": 2.073, "inference_avg_ms": 47.4403, "inference_std_ms": 1.087,
     "inference_min_ms": 44.914, "inference_max_ms": 49.309, "runs": 30,
     "model_size_mb": 13.9926, "peak_memory_mb": {"init": 1.26562, "overall": 26.6641}}
"""

import json
import re
import sys

NUMBER = r"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
TIMINGS = re.compile(r"Inference timings in us: Init: {0}, First inference: {0}, "
                     r"Warmup \(avg\): {0}, Inference \(avg\): {0}".format(NUMBER))
# One line per benchmark phase, warm-up first: count=30 first=57338 curr=46893 min=45730 max=57338 avg=47674.1 std=2073
PHASE = re.compile(r"count=(\d+) first={0} curr={0} min={0} max={0} avg={0} std={0}".format(NUMBER))
MODEL_SIZE = re.compile(r"The input model file size \(MB\): " + NUMBER)
# Older tools print "Peak memory footprint", newer ones "Memory footprint delta from the start of the tool".
FOOTPRINT = re.compile(r"(?:Peak memory footprint|Memory footprint delta from the start of the tool) "
                       r"\(MB\): init={0} overall={0}".format(NUMBER))
PEAK_MONITORED = re.compile(r"Overall peak memory footprint \(MB\) via periodic monitoring: " + NUMBER)


def _ms(us: str) -> float:
    return round(float(us) / 1000, 6)


def parse(text: str) -> dict:
    """The figures of one benchmark_model run; ValueError if the run did not finish."""
    timings = TIMINGS.search(text)
    if timings is None:
        raise ValueError("no 'Inference timings in us' line: benchmark_model did not finish")
    init, first, warmup, inference = timings.groups()
    result = {"init_ms": _ms(init), "first_inference_ms": _ms(first),
              "warmup_avg_ms": _ms(warmup), "inference_avg_ms": _ms(inference)}
    phases = PHASE.findall(text)
    if phases:
        result["warmup_std_ms"] = _ms(phases[0][6])
    if len(phases) > 1:
        count, _, _, low, high, _, std = phases[-1]
        result.update(inference_std_ms=_ms(std), inference_min_ms=_ms(low), inference_max_ms=_ms(high),
                      runs=int(count))
    if size := MODEL_SIZE.search(text):
        result["model_size_mb"] = float(size.group(1))
    if footprint := FOOTPRINT.search(text):
        result["peak_memory_mb"] = {"init": float(footprint.group(1)), "overall": float(footprint.group(2))}
    if peak := PEAK_MONITORED.search(text):
        result.setdefault("peak_memory_mb", {})["monitored"] = float(peak.group(1))
    return result


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Parse benchmark_model's output into one JSON object.")
    parser.add_argument("log", help="the tool's output, or - for standard input")
    parser.add_argument("--threads", type=int, help="record this thread count in the object")
    args = parser.parse_args(argv)
    try:
        text = sys.stdin.read() if args.log == "-" else open(args.log, encoding="utf-8", errors="replace").read()
        result = parse(text)
    except (OSError, ValueError) as e:
        print(f"parse_benchmark_model: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"threads": args.threads, **result} if args.threads else result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
