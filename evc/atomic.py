"""Folders that appear whole or not at all: written under a temporary name, renamed into place.

Temporary names carry the writer's pid, so a later build can tell what a
killed build left behind from what a running one is still writing. When the
machine refuses a write (a full disk, a read-only or vanished folder, no
permission), what was written is removed and a ResourceError says where, what
was being written and, for space, how much it needed and how much is free.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from evc.errors import ResourceError

# What the operating system says when it will not let a write happen: always about a write (space, a read-only
# file system), or about one when it names a path where evc writes (permission, a folder gone).
_SPACE = {errno.ENOSPC, errno.EDQUOT}
_ALWAYS = _SPACE | {errno.EROFS}
_WHERE = {errno.EACCES, errno.EPERM, errno.ENOENT}

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
def staged(final: Path, what: str | None = None):
    """Yield a temporary folder; on success it replaces `final`, on any failure it is removed. `what` says what is
    being written, for the error when the machine refuses it ("write the bundle of target 'cpu'")."""
    what = what or f"write {final}"
    written = 0
    try:
        recover(final)
        tmp = temp_dir(final)
        try:
            yield tmp
        except BaseException:
            written = _size(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, final)
    except Exception as e:  # an exporter may wrap the OSError in its own type: its cause still says
        if not refused_write(e, final):
            raise
        raise resource_error(e, final, what, written) from None


def refused_write(error: BaseException, where: Path | None = None) -> bool:
    """Whether `error` (or what caused it) is the machine refusing a write, under `where` when given: no
    space, a read-only file system, or no permission or a vanished folder naming a path there. torch.save
    reports a full disk as a RuntimeError of its stream writer."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _ALWAYS:
            return True
        if isinstance(error, OSError) and error.errno in _WHERE:
            named = [Path(f) for f in (error.filename, error.filename2) if f]
            if where is None or any(_under(n, where.parent) for n in named):
                return True
        if isinstance(error, RuntimeError) and ("PytorchStreamWriter" in str(error) or
                                                "inline_container" in str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def resource_error(error: BaseException, final: Path, what: str, written: int = 0) -> ResourceError:
    """The refusal of a write of `final` in words: the path, what was being written and, for space, the bytes."""
    code = _errno(error)
    folder = _existing(final.parent)
    if code in _SPACE or code is None:
        free = shutil.disk_usage(folder).free
        needed = f"more than {written:,} bytes (it had written that much when the disk filled)" if written \
            else "more space"
        return ResourceError(f"no space left on the device to {what}: it needed {needed}, and {free:,} bytes are "
                             f"free in {folder}; free some, or give another --out; nothing was left half-written")
    reason = {errno.EROFS: "is on a read-only file system", errno.ENOENT: "vanished while it was written"}.get(
        code, "is not writable (permission denied)")
    where = final.parent if code == errno.ENOENT else folder
    return ResourceError(f"cannot {what}: {where} {reason}; nothing was left half-written")


def _errno(error: BaseException) -> int | None:
    while error is not None:
        if isinstance(error, OSError) and error.errno is not None:
            return error.errno
        error = error.__cause__ or error.__context__
    return None  # torch's stream writer: a full disk


def _under(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def require_space(final: Path, needed: int, what: str) -> None:
    """Refuse at once, before writing anything, a write of `needed` bytes that the disk under `final` cannot hold."""
    folder = _existing(final.parent)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ResourceError(f"no space left on the device to {what}: it needs {needed:,} bytes, and {free:,} bytes "
                            f"are free in {folder}; free some, or give another --out; nothing was written")


def _existing(path: Path) -> Path:
    """`path`, or the nearest folder above it that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def recover(final: Path) -> None:
    """Undo what a killed writer left: its temporary folders, an old `final` moved aside."""
    remove_stale(final)
    aside = final.with_name(f".{final.name}.old")
    if aside.is_dir():
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(aside, final)


def write_text(path: Path, text: str, what: str | None = None) -> None:
    """`path` holds `text` whole, or keeps what it held: written beside it, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        if not refused_write(e, path):
            raise
        raise resource_error(e, path, what or f"write {path}", len(text.encode())) from None
    finally:
        tmp.unlink(missing_ok=True)
