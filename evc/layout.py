"""A bundle's files that more than one tool reads or writes, named once.

    manifest = read_manifest(bundle)      # None when the folder has no readable manifest.json
    bundle / BENCH_RESULTS                # what the last `evc bench` of the bundle measured here
"""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "manifest.json"
BENCH_RESULTS = "results/evc_bench.json"  # `evc bench`'s figures, measured here (evc.tools.bench.save)


def read_manifest(bundle: Path) -> dict | None:
    try:
        return json.loads((bundle / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
