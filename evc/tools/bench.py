"""`evc bench BUNDLE`: time here every artifact of a bundle that has a runtime here.

With `--serial`, the bundle's device benchmarks it instead (an Android phone
over adb), where its device profile knows how. The figures measured here are
kept in the bundle as `results/evc_bench.json`, which `evc report` reads.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from evc.atomic import write_text
from evc.errors import InputError
from evc.layout import BENCH_RESULTS, read_manifest
from evc.registry import DEVICES, FORMATS, RemoteBench, Runtime
from evc.runtime.parity import describe
from evc.runtime.timing import measure, thread_count


def bench_here(bundle: Path, manifest: dict, runs: int | None = None, threads=None) -> list[dict]:
    """One row per artifact with a runtime here and per thread count."""
    # Timing here is what a cpu target's bench script does: its keys fill in those the bundle's device lacks.
    params = {**{p.name: p.default for p in DEVICES["cpu"].params}, **manifest["target"]["params"]}
    runs = runs or params["runs"]
    counts = [thread_count(t) for t in (threads or params["threads"])]
    feed = np.random.default_rng(0).standard_normal(manifest["input"]["shape"], dtype=np.float32)
    rows = []
    for artifact in manifest["artifacts"]:
        fmt = FORMATS[artifact["format"]].plugin if artifact["format"] in FORMATS else None
        if not isinstance(fmt, Runtime):
            continue
        for count in dict.fromkeys(counts):
            run = fmt.session(bundle / artifact["path"], count)
            rows.append({"artifact": artifact, "threads": count,
                         **measure(run, feed, runs, params["warmups"])})
    return rows


def bench(bundle: Path, runs: int | None = None, threads=None, serial: str | None = None,
          console: Console | None = None):
    console = console or Console()
    manifest = read_manifest(bundle)
    if manifest is None:
        raise InputError(f"{bundle} is not a bundle: it has no readable manifest.json")
    if serial is not None:
        device = DEVICES.get(manifest["target"]["device"])
        if device is None or not isinstance(device.plugin, RemoteBench):
            raise InputError(f"--serial: the {manifest['target']['device']} device of {bundle} is not "
                             "benchmarked remotely; run its bench script on the device")
        return device.plugin.bench(bundle, manifest, serial, runs, console)
    rows = bench_here(bundle, manifest, runs, threads)
    if not rows:
        raise InputError(f"no artifact of {bundle} has a runtime on this machine; "
                         "see its README for benchmarking on the device")
    table = Table(title=f"{bundle} on this machine")
    for column in ("artifact", "format", "MB", "parity", "threads", "median ms", "p90 ms", "images/s"):
        table.add_column(column, justify="right" if column not in ("artifact", "parity") else "left")
    for row in rows:
        a = row["artifact"]
        table.add_row(a["path"], a["format"], f"{a['size'] / 1e6:.1f}", describe(a.get("parity")),
                      str(row["threads"]), f"{row['median_ms']:.2f}", f"{row['p90_ms']:.2f}",
                      f"{row['throughput_per_s']:.1f}")
    console.print(table)
    save(bundle, rows)
    return rows


def bench_record(bundle: Path, rows: list[dict], serial: str | None = None) -> dict:
    """What `evc bench --json` prints (docs/json.md): the bundle, and a row per artifact and thread count.

    Rows timed here name their artifact by path with its format, size and parity; a phone's rows are its
    parsed benchmark_model figures as they are.
    """
    manifest = read_manifest(bundle)
    here = [{"artifact": r["artifact"]["path"], "format": r["artifact"]["format"], "size": r["artifact"]["size"],
             "parity": r["artifact"].get("parity"), "threads": r["threads"], "median_ms": r["median_ms"],
             "p90_ms": r["p90_ms"], "throughput_per_s": r["throughput_per_s"]} for r in rows] if serial is None \
        else rows
    return {"schema": "evc.bench/1", "bundle": str(bundle), "target": manifest["target"]["name"],
            "device": manifest["target"]["device"], "on": serial or "here", "rows": here}


def save(bundle: Path, rows: list[dict]) -> None:
    """The figures measured here, in the bundle (replacing the last run's): one row per artifact and thread
    count, with the machine they were measured on."""
    machine = {"processor": platform.processor() or platform.machine(), "system": platform.platform(),
               "cpus": os.cpu_count()}
    record = {"machine": machine, "results": [{"artifact": r["artifact"]["path"], "threads": r["threads"],
                                                "median_ms": r["median_ms"], "p90_ms": r["p90_ms"],
                                                "throughput_per_s": r["throughput_per_s"]} for r in rows]}
    (bundle / BENCH_RESULTS).parent.mkdir(exist_ok=True)
    write_text(bundle / BENCH_RESULTS, json.dumps(record, indent=1) + "\n", "save the figures in the bundle")
