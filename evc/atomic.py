"""Folders that appear whole or not at all: written under a temporary name, renamed into place.

Temporary names carry the writer's pid, so a later build can tell what a
killed build left behind from what a running one is still writing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

_stopping = False
_parents: set[Path] = set()  # folders this process makes temporary folders in


def stop() -> None:
    """Put nothing more into place in this process: a build told to stop (SIGTERM) raises KeyboardInterrupt,
    but one that lands while Python runs a finalizer is printed and dropped, and the build would go on."""
    global _stopping
    _stopping = True


def temp_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    _parents.add(final.parent)  # before the folder exists: a stop landing in between still finds it
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the result private once renamed
    return tmp


def remove_own() -> None:
    """Remove every temporary folder this process made and has not put into place: what a stop
    interrupted, even between making a folder and handing it to the `staged` block that owns it."""
    for parent in _parents:
        for tmp in parent.glob(f".*.{os.getpid()}.*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(final: Path) -> None:
    """Remove temporary folders for `final` whose writer is gone."""
    if not final.parent.is_dir():
        return
    for tmp in final.parent.glob(f".{final.name}.*.tmp"):
        pid = tmp.name[len(final.name) + 2:].split(".")[0]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(new: Path, final: Path) -> None:
    """Put `new` at `final`. An old `final` is moved aside, not deleted, until `new` is in place."""
    if _stopping:
        shutil.rmtree(new, ignore_errors=True)
        raise KeyboardInterrupt
    aside = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
    os.rename(new, final)
    shutil.rmtree(aside, ignore_errors=True)


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


def recover(final: Path) -> None:
    """Undo what a killed writer left: its temporary folders, an old `final` moved aside."""
    remove_stale(final)
    aside = final.with_name(f".{final.name}.old")
    if aside.is_dir():
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(aside, final)


def write_text(path: Path, text: str) -> None:
    """`path` holds `text` whole, or keeps what it held: written beside it, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
