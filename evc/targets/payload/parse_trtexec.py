#!/usr/bin/env python3
"""Parse TensorRT's trtexec summary and a tegrastats power log into JSON. Standard library only:
this file is copied into Jetson bundles and runs on the board.

    python3 parse_trtexec.py trtexec.log --power power.log --idle idle.log > results.json

From trtexec: throughput and the latency and GPU-compute statistics (ms).
From tegrastats: the mean of each power rail (mW) during the run and at
idle, and the energy per inference: mean board input power / throughput.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys

_STAT = re.compile(r"(min|max|mean|median|percentile\((\d+)%\))\s*=\s*([\d.]+)\s*ms")
_SUMMARIES = {"Latency": "latency_ms", "GPU Compute Time": "gpu_compute_ms", "Enqueue Time": "enqueue_ms",
              "H2D Latency": "h2d_ms", "D2H Latency": "d2h_ms"}
# tegrastats rails: `VDD_IN 4977mW/4977mW` (Orin) or `POM_5V_IN 3500/3500` (Xavier, TX2).
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*)\s+(\d+)(?:mW)?/(\d+)(?:mW)?")
# The rail that carries the whole board's input power, by Jetson generation.
BOARD_INPUT_RAILS = ("VDD_IN", "POM_5V_IN", "VIN_SYS_5V0", "VDD_IN_SYS")


def _stats(text: str) -> dict:
    stats = {}
    for name, percentile, value in _STAT.findall(text):
        stats[f"p{percentile}" if percentile else name] = float(value)
    return stats


def parse_trtexec(text: str) -> dict:
    """The performance summary of a trtexec run."""
    result = {}
    throughput = re.search(r"Throughput:\s*([\d.]+)\s*qps", text)
    if throughput is None:
        raise ValueError("no 'Throughput: ... qps' line: not the output of a finished trtexec run")
    result["throughput_qps"] = float(throughput[1])
    for line in text.splitlines():
        for label, key in _SUMMARIES.items():
            if re.search(rf"\]\s*{re.escape(label)}:|^{re.escape(label)}:", line.strip()):
                result[key] = _stats(line)
    walltime = re.search(r"Total Host Walltime:\s*([\d.]+)\s*s", text)
    if walltime:
        result["host_walltime_s"] = float(walltime[1])
    if "latency_ms" not in result:
        raise ValueError("no 'Latency: min = ... ms' line in the trtexec output")
    return result


def parse_tegrastats(text: str) -> dict[str, float]:
    """Mean instantaneous power of each rail over the log's lines, in mW."""
    samples: dict[str, list[float]] = {}
    for line in text.splitlines():
        for rail, now, _average in _RAIL.findall(line):
            if rail in ("RAM", "SWAP", "IRAM", "LFB"):
                continue
            samples.setdefault(rail, []).append(float(now))
    return {rail: statistics.fmean(values) for rail, values in samples.items()}


def board_input(rails: dict[str, float]) -> tuple[str, float] | None:
    for rail in BOARD_INPUT_RAILS:
        if rail in rails:
            return rail, rails[rail]
    return None


def energy(trtexec: dict, power: dict[str, float], idle: dict[str, float] | None = None) -> dict:
    """Energy per inference from the board's input power during the run and the throughput."""
    found = board_input(power)
    if found is None:
        raise ValueError(f"no board input rail ({', '.join(BOARD_INPUT_RAILS)}) in the tegrastats log")
    rail, run_mw = found
    result = {"rail": rail, "run_power_mw": run_mw,
              "energy_per_inference_mj": run_mw / trtexec["throughput_qps"]}
    if idle and rail in idle:
        result["idle_power_mw"] = idle[rail]
        result["energy_above_idle_mj"] = (run_mw - idle[rail]) / trtexec["throughput_qps"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Parse trtexec and tegrastats logs into JSON.")
    parser.add_argument("trtexec_log")
    parser.add_argument("--power", help="tegrastats log during the run")
    parser.add_argument("--idle", help="tegrastats log at idle, before the run")
    args = parser.parse_args(argv)
    try:
        with open(args.trtexec_log) as f:
            result = {"trtexec": parse_trtexec(f.read())}
        if args.power:
            with open(args.power) as f:
                power = parse_tegrastats(f.read())
            idle = None
            if args.idle:
                with open(args.idle) as f:
                    idle = parse_tegrastats(f.read())
            result["power_rails_mw"] = power
            result["energy"] = energy(result["trtexec"], power, idle)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
