"""The stage cache: each stage's result on disk under its key (see `evc.keys`).

    folder = cache.get("lower", key)
    if folder is None:
        with cache.entry("lower", key) as out:
            ...                                  # write the result into `out`
        folder = cache.path("lower", key)

An entry is written to a temporary folder and renamed into place when the
block ends, so a killed build never leaves a half entry that a later build
would trust.
"""

from __future__ import annotations

from pathlib import Path

from evc.atomic import staged


class Cache:
    """`fresh` (a forced build) reads no entry and replaces every entry it writes."""

    def __init__(self, root: Path, fresh: bool = False):
        self.root, self.fresh = root, fresh

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get(self, stage: str, key: str) -> Path | None:
        path = self.path(stage, key)
        return path if path.is_dir() and not self.fresh else None

    def entry(self, stage: str, key: str):
        """A context manager yielding the folder to write the entry in; it becomes the entry if the block ends
        normally and is removed if it fails."""
        return staged(self.path(stage, key))
