"""The stage cache: each stage's result on disk under its key (see `evc.keys`).

    path = cache.get("lower", keys.lower["x5"]) or cache.put("lower", keys.lower["x5"], write)

Entries are written to a temporary folder and renamed into place, so a
killed build never leaves a half entry that a later build would trust.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from evc.atomic import recover, replace_dir, temp_dir


class Cache:
    """`fresh` (a forced build) reads no entry and replaces every entry it writes."""

    def __init__(self, root: Path, fresh: bool = False):
        self.root, self.fresh = root, fresh

    def get(self, stage: str, key: str) -> Path | None:
        path = self.root / stage / key
        return path if path.is_dir() and not self.fresh else None

    def put(self, stage: str, key: str, write: Callable[[Path], None]) -> Path:
        final = self.root / stage / key
        recover(final)
        tmp = temp_dir(final)
        try:
            write(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, final)
        return final
