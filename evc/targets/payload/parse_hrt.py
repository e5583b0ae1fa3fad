#!/usr/bin/env python3
"""Read the results of `hrt_model_exec perf` (Horizon's BPU runtime tool) from its output.

Standard library only: evc copies this file into RDK bundles and it runs on the board.

    python3 parse_hrt.py perf_threads_1.log perf_threads_4.log          # a table
    python3 parse_hrt.py --json perf_threads_*.log                      # one JSON object

It reads both forms the tool prints: the closing summary, whose lines include

    Average    latency    is: 16.090725 ms
    Frame      rate       is: 242.879564 FPS

and the one-line progress report

    Frame count: 200,  Thread Average: 16.090725 ms,  thread max latency: 21.35 ms,  thread min latency: 8.11 ms,  FPS: 242.88
"""

import argparse
import json
import re
import sys

NUMBER = r"([0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)"
SUMMARY = {
    "threads": re.compile(r"Thread\s+number\s+is\s*:\s*" + NUMBER),
    "frames": re.compile(r"Frame\s+count\s+is\s*:\s*" + NUMBER),
    "run_time_ms": re.compile(r"Program\s+run\s+time\s*:\s*" + NUMBER + r"\s*ms"),
    "latency_ms": re.compile(r"Average\s+latency\s+is\s*:\s*" + NUMBER + r"\s*ms"),
    "fps": re.compile(r"Frame\s+rate\s+is\s*:\s*" + NUMBER + r"\s*FPS"),
}
LINE = re.compile(
    r"Frame\s+count\s*:\s*" + NUMBER + r"\s*,\s*Thread\s+Average\s*:\s*" + NUMBER + r"\s*ms\s*,"
    r"\s*thread\s+max\s+latency\s*:\s*" + NUMBER + r"\s*ms\s*,\s*thread\s+min\s+latency\s*:\s*" + NUMBER
    + r"\s*ms\s*,\s*FPS\s*:\s*" + NUMBER, re.IGNORECASE)
INTEGERS = ("threads", "frames")


def parse_perf(text):
    """The result of one `hrt_model_exec perf` run: latency_ms and fps, with what else it printed.

    The closing summary wins where both forms are present; without it, the last
    one-line report gives frames, latency_ms (the thread average) and fps.
    Raises ValueError when `text` holds neither form.
    """
    result = {}
    lines = LINE.findall(text)
    if lines:
        frames, average, high, low, fps = (float(v) for v in lines[-1])
        result.update(frames=int(frames), latency_ms=average, max_latency_ms=high, min_latency_ms=low, fps=fps)
    for key, pattern in SUMMARY.items():
        found = pattern.findall(text)
        if found:
            value = float(found[-1])
            result[key] = int(value) if key in INTEGERS else value
    if "latency_ms" not in result or "fps" not in result:
        raise ValueError("no hrt_model_exec perf result found (neither 'Average latency is: X ms' and "
                         "'Frame rate is: Y FPS', nor a 'Frame count: ..., Thread Average: ..., FPS: ...' line)")
    result["form"] = "summary" if SUMMARY["fps"].search(text) else "line"
    return result


def table(rows):
    header = f"{'log':<28} {'threads':>7} {'frames':>7} {'latency ms':>11} {'FPS':>9}"
    body = [f"{r['log']:<28} {_show(r.get('threads')):>7} {_show(r.get('frames')):>7} "
            f"{r['latency_ms']:>11.3f} {r['fps']:>9.1f}" for r in rows]
    return "\n".join([header, *body])


def _show(value):
    return "-" if value is None else str(value)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Read hrt_model_exec perf results from its logs.")
    parser.add_argument("logs", nargs="+", help="files holding hrt_model_exec perf output")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    rows = []
    for path in args.logs:
        try:
            with open(path, encoding="utf-8", errors="replace") as log:
                rows.append({"log": path, **parse_perf(log.read())})
        except (OSError, ValueError) as e:
            print(f"parse_hrt.py: {path}: {e}", file=sys.stderr)
            return 1
    print(json.dumps({"results": rows}) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
