"""The stage cache: each stage's result on disk under its key (see `evc.keys`), verified on every read.

    folder = cache.get("lower", key)
    if folder is None:
        with cache.entry("lower", key) as out:
            ...                                  # write the result into `out`
        folder = cache.path("lower", key)

An entry is written to a temporary folder and renamed into place when the
block ends, so a killed build never leaves a half entry that a later build
would trust. Every entry carries the sha256 of each of its files, taken when
it was written; a read checks them, as Bazel checks its content store, and an
entry whose files no longer match (a bad disk, a half-synced shared cache, a
hand's edit) is a miss: it is removed, said in one line, and rebuilt. No
file of a corrupt entry ever reaches a bundle.
"""

from __future__ import annotations

import json
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from evc.atomic import staged

DIGESTS = ".digests.json"  # in each entry: {"files": {relative path: sha256}}


class Cache:
    """`fresh` (a forced build) reads no entry and replaces every entry it writes. `warn(message)` says that an
    entry was corrupt (on standard error by default)."""

    def __init__(self, root: Path, fresh: bool = False, warn=None):
        self.root, self.fresh = root, fresh
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get(self, stage: str, key: str) -> Path | None:
        """The entry's folder when it is there and every file matches its digest; else None."""
        path = self.path(stage, key)
        if self.fresh or not path.is_dir():
            return None
        fault = corruption(path)
        if fault is not None:
            self.warn(f"cache entry {stage}/{key} was corrupt ({fault}): removed, and built again")
            shutil.rmtree(path, ignore_errors=True)
            return None
        return path

    @contextmanager
    def entry(self, stage: str, key: str):
        """A context manager yielding the folder to write the entry in; it becomes the entry, with its files'
        digests, if the block ends normally, and is removed if it fails."""
        with staged(self.path(stage, key), f"write the cache entry {stage}/{key}") as folder:
            yield folder
            (folder / DIGESTS).write_text(json.dumps({"files": digests(folder)}, indent=1) + "\n")


def digests(folder: Path) -> dict[str, str]:
    """The sha256 of every file under `folder` by its relative path, the digests' own file left out."""
    from evc.keys import file_digest

    return {p.relative_to(folder).as_posix(): file_digest(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != DIGESTS}


def corruption(folder: Path) -> str | None:
    """What is wrong with a cache entry's files against its recorded digests, or None when nothing is."""
    try:
        recorded = json.loads((folder / DIGESTS).read_text())["files"]
    except FileNotFoundError:
        return f"it has no {DIGESTS}: written by an earlier evc, or cut short"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {DIGESTS} cannot be read: {e}"
    found = digests(folder)
    for name in sorted(set(recorded) | set(found)):
        if name not in found:
            return f"{name} is missing"
        if name not in recorded:
            return f"{name} was not in it when it was written"
        if found[name] != recorded[name]:
            return f"{name} does not match its sha256"
    return None
