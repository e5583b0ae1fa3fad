"""When the machine refuses a write: real small file systems (tmpfs), filled, made read-only or taken away.

A build that cannot write exits 1 naming the path, what it was writing and, for space, the bytes needed and
free; the previous bundle stays whole and nothing half-written is left.
"""

import errno
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from evc.atomic import staged
from evc.errors import ResourceError
from tests.conftest import run_evc, small_spec

pytestmark = pytest.mark.slow  # builds into file systems mounted for the test


@pytest.fixture
def disk(tmp_path):
    """mount(size) -> a folder on a tmpfs of that many bytes, unmounted after the test."""
    mounted = []

    def mount(size: int):
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (run the tests as root, as the README does): {done.stderr}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def spec_in(folder):
    spec = folder / "small.evc"
    spec.write_text(small_spec())
    return spec


def leftovers(folder) -> list:
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".old"))]


def fill(folder, leave: int) -> None:
    """Take every byte of the file system but `leave`."""
    free = shutil.disk_usage(folder).free
    (folder / "filler").write_bytes(b"\0" * max(0, free - leave))


@pytest.mark.parametrize("size, writing", [
    (2 << 20, "write the cache entry program/"),  # torch.save of the program: its stream writer's error
    (5 << 20, "write the cache entry lower/"),  # the ONNX export
])
def test_a_disk_that_fills_during_a_build_exits_1_saying_where_and_how_much(disk, tmp_path, size, writing):
    out = disk(size)
    done = run_evc("build", spec_in(tmp_path), "--out", out)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: no space left on the device to {writing}")
    needed, free = (int(n.replace(",", "")) for n in re.findall(r"([\d,]+) bytes", message))
    assert needed > 0 and free < size and str(out) in message
    assert leftovers(out) == []


def test_a_bundle_the_disk_cannot_hold_is_refused_before_a_byte_with_the_bytes_needed(disk, tmp_path):
    out = disk(64 << 20)
    spec = spec_in(tmp_path)
    assert run_evc("build", spec, "--out", out).returncode == 0
    shutil.rmtree(out / "small" / "cpu")
    fill(out, leave=1 << 20)
    done = run_evc("build", spec, "--out", out)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "no space left on the device to write the bundle of target 'cpu': it needs" in done.stderr
    assert not (out / "small" / "cpu").exists() and leftovers(out) == []


def test_a_forced_rebuild_on_a_full_disk_leaves_the_old_bundle_whole(disk, tmp_path):
    out = disk(64 << 20)
    spec = spec_in(tmp_path)
    assert run_evc("build", spec, "--out", out).returncode == 0
    fill(out, leave=256 << 10)
    done = run_evc("build", spec, "--out", out, "--force")
    assert done.returncode == 1 and "no space left on the device" in done.stderr
    assert run_evc("verify", out / "small" / "cpu").returncode == 0
    assert leftovers(out) == []


def test_a_read_only_output_folder_exits_1_naming_it_and_keeps_the_old_bundle(disk, tmp_path):
    out = disk(64 << 20)
    spec = spec_in(tmp_path)
    assert run_evc("build", spec, "--out", out).returncode == 0
    subprocess.run(["mount", "-o", "remount,ro", str(out)], check=True)
    done = run_evc("build", spec, "--out", out, "--force")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"{out}/.cache/program is on a read-only file system" in done.stderr
    assert run_evc("verify", out / "small" / "cpu").returncode == 0


def test_evc_report_on_a_full_disk_exits_1_naming_the_report(disk, tmp_path):
    out = disk(64 << 20)
    assert run_evc("build", spec_in(tmp_path), "--out", out).returncode == 0
    (out / "small" / "report.html").unlink()
    fill(out, leave=0)
    done = run_evc("report", out / "small")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "no space left on the device to write the build's report" in done.stderr
    assert leftovers(out) == []


@pytest.mark.parametrize("code, said", [(errno.ENOENT, "vanished while it was written")])
def test_a_folder_taken_away_while_it_is_written_is_named(tmp_path, code, said):
    final = tmp_path / "out" / "bundle"
    with pytest.raises(ResourceError, match=said) as caught:
        with staged(final, "write the bundle") as folder:
            (folder / "model.onnx").write_bytes(b"x")
            shutil.rmtree(tmp_path / "out")  # the folder the bundle goes in, gone (an unmounted disk)
    assert str(final.parent) in str(caught.value)


def test_an_output_folder_the_user_may_not_write_exits_1_naming_it(tmp_path):
    """As a user without root (root may write anywhere): the build is run as `nobody`."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to run the build as another user")
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    shared = tempfile.mkdtemp()  # pytest's own folders are private to root
    try:
        os.chmod(shared, 0o755)
        if subprocess.run([*as_nobody, sys.executable, "-c", "import evc"], capture_output=True, cwd=shared,
                          env={**os.environ, "HOME": shared}).returncode != 0:
            pytest.skip("the user nobody cannot run this checkout's Python (it lies in a folder private to root)")
        spec = spec_in(Path(shared))
        out = Path(shared) / "out"
        out.mkdir(mode=0o755)
        done = subprocess.run([*as_nobody, sys.executable, "-m", "evc", "build", str(spec), "--out", str(out)],
                              capture_output=True, text=True, cwd=shared, env={**os.environ, "HOME": shared})
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert f"{out} is not writable (permission denied)" in done.stderr
        assert list(out.iterdir()) == []
    finally:
        shutil.rmtree(shared, ignore_errors=True)
