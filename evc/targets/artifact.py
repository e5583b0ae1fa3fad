"""What a target writes: an artifact file, described for the manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Artifact:
    path: Path  # relative to the bundle
    format: str
    parity: dict | None = None
    accuracy: dict | None = None  # top-k on the evaluate block's data, when the spec has one
    details: dict = field(default_factory=dict)  # format-specific facts (opset, ops, ...)

    def describe(self, root: Path) -> dict:
        from evc.keys import file_digest  # hashlib: not on `evc check`'s path, which imports the formats

        file = root / self.path
        return {
            "path": str(self.path),
            "format": self.format,
            "size": file.stat().st_size,
            "sha256": file_digest(file),
            "parity": self.parity,
            **({"accuracy": self.accuracy} if self.accuracy is not None else {}),
            **self.details,
        }

