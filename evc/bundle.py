"""Writing a bundle so that no one ever sees half of one.

A bundle is built in a hidden temporary folder beside its final place and
renamed into place only when complete. The previous good bundle is moved
aside, not deleted, until the new one is in place.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

from evc.atomic import recover, replace_dir, temp_dir

MANIFEST = "manifest.json"


@contextmanager
def staged(final: Path):
    """Yield a temporary folder; on success it replaces `final`, on any failure it is removed."""
    recover(final)
    tmp = temp_dir(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def read_manifest(bundle: Path) -> dict | None:
    try:
        return json.loads((bundle / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
