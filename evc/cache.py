"""The stage cache: each stage's result on disk under a key hashed from what it depends on.

    key = stage_key("load", plan.model, weights_sha256, library_versions())
    path = cache.get("load", key) or cache.put("load", key, write)

Entries are written to a temporary folder and renamed into place, so a
killed build never leaves a half entry that a later build would trust.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from evc.atomic import recover, replace_dir, temp_dir
from evc.params import PerLayer

# Libraries whose versions change what a stage produces.
_LIBRARIES = ("evc", "torch", "timm", "onnx", "onnxruntime", "onnxslim", "litert-torch", "ai-edge-litert",
              "ai-edge-quantizer")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def canonical(value: Any) -> Any:
    """A JSON-able form that ignores source spans, so a moved comment does not invalidate."""
    if isinstance(value, PerLayer):
        return list(value.values)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name not in ("span", "spans")}
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in value.items()}  # stage_key sorts when it hashes
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def stage_key(*parts: Any) -> str:
    text = json.dumps(canonical(list(parts)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


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
