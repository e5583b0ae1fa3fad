"""`evc bench BUNDLE`: run the bundle's generated benchmark here and print its table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from evc.bundle import read_manifest
from evc.errors import BuildError, InputError


def run_bench_script(bundle: Path, runs: int | None = None, threads: list[str] | None = None) -> dict:
    manifest = read_manifest(bundle)
    if manifest is None:
        raise InputError(f"{bundle} is not a bundle: it has no readable manifest.json")
    script = bundle / "bench.py"
    if not script.is_file():
        raise InputError(f"bundle {bundle} has no benchmark that runs on this machine (no bench.py)")
    command = [sys.executable, str(script), "--json"]
    if runs:
        command += ["--runs", str(runs)]
    if threads:
        command += ["--threads", *threads]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"{script} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "manifest": manifest}


def bench(bundle: Path, runs: int | None = None, threads: list[str] | None = None,
          console: Console | None = None) -> dict:
    result = run_bench_script(bundle, runs, threads)
    console = console or Console()
    artifact = result["manifest"]["artifacts"][0]
    parity = artifact["parity"]
    console.print(f"{bundle}: {artifact['path']}, {artifact['format']}, {artifact['size'] / 1e6:.1f} MB, "
                  f"parity max|Δ| {parity['max_abs_diff']:.2g} (top-1 agreement {parity['top1_agreement']:.0%}), "
                  f"on {result['runtime']}")
    table = Table()
    for column in ("threads", "median ms", "p90 ms", "images/s"):
        table.add_column(column, justify="right")
    for row in result["results"]:
        table.add_row(str(row["threads"]), f"{row['median_ms']:.2f}", f"{row['p90_ms']:.2f}",
                      f"{row['throughput_per_s']:.1f}")
    console.print(table)
    return result
