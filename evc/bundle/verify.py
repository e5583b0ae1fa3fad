"""A bundle against its manifest: every file it lists, with the sha256 it records.

    problems = verify(Path("build/deit_tiny_x5/x5"))   # [] when every file is there and matches
    evc verify build/deit_tiny_x5/x5                   # the same, for the device side and CI

A bundle is checked so before it is put in place (`evc.bundle.write`), and can
be again wherever it is copied. Files a bundle gains later (its `results/`,
what the device's toolchain writes beside it) are not the manifest's to vouch
for, and are left alone.
"""

from __future__ import annotations

from pathlib import Path

from evc.errors import InputError
from evc.layout import read_manifest


def verify(bundle: Path) -> list[str]:
    """One line per file of `bundle` that is missing or differs from what its manifest records."""
    from evc.cache import digests

    manifest = read_manifest(bundle)
    if manifest is None:
        raise InputError(f"{bundle} is not a bundle: it has no readable manifest.json")
    recorded = dict(manifest.get("files") or {})
    for artifact in manifest.get("artifacts", ()):
        recorded.setdefault(artifact["path"], artifact["sha256"])
    if not recorded:
        raise InputError(f"{bundle}/manifest.json records no file digests (written by an earlier evc): build it "
                         "again to verify it")
    found = digests(bundle)
    problems = []
    for name, sha256 in sorted(recorded.items()):
        if name not in found:
            problems.append(f"{name}: missing")
        elif found[name] != sha256:
            problems.append(f"{name}: does not match the sha256 manifest.json records ({sha256[:12]}…, "
                            f"found {found[name][:12]}…)")
    for artifact in manifest.get("artifacts", ()):
        if recorded[artifact["path"]] != artifact["sha256"]:
            problems.append(f"{artifact['path']}: manifest.json records two digests for it")
    return problems
