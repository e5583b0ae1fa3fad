"""The cache: canonical forms of checked values in its keys, and entries verified on every read."""

from evc.keys import canonical, stage_key
from evc.spec.params import PerLayer
from evc.spec.parse import Span


def test_canonical_turns_a_record_dict_with_per_layer_lists_and_tuples_into_json():
    record = {"keep": PerLayer((1.0, 0.5), Span(1, 1, 1, 2)), "search": {"steps": (8, 16), "data": "calib"}}
    assert canonical({"search": record}) == {"search": {"keep": [1.0, 0.5],
                                                        "search": {"steps": [8, 16], "data": "calib"}}}


def test_a_value_changed_inside_a_record_changes_the_stage_key():
    a = {"search": {"step": 8, "keep": PerLayer((1.0, 0.5), Span(1, 1, 1, 2))}}
    moved = {"search": {"step": 8, "keep": PerLayer((1.0, 0.5), Span(9, 9, 9, 10))}}
    b = {"search": {"step": 16, "keep": PerLayer((1.0, 0.5), Span(1, 1, 1, 2))}}
    assert stage_key(a) == stage_key(moved) != stage_key(b)


# ---- a verified cache ----------------------------------------------------------------------------

import hashlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from evc.cache import DIGESTS, Cache  # noqa: E402
from tests.conftest import ROOT, run_evc, small_spec  # noqa: E402


def written(root, files: dict) -> Cache:
    warned = []
    cache = Cache(root, warn=warned.append)
    with cache.entry("lower", "k") as folder:
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
    cache.warned = warned
    return cache


def test_an_entry_records_the_sha256_of_every_file_and_reads_back_whole(tmp_path):
    cache = written(tmp_path, {"model.onnx": b"weights", "part0/model.onnx": b"part"})
    recorded = json.loads((cache.path("lower", "k") / DIGESTS).read_text())["files"]
    assert recorded == {"model.onnx": hashlib.sha256(b"weights").hexdigest(),
                        "part0/model.onnx": hashlib.sha256(b"part").hexdigest()}
    assert cache.get("lower", "k") == cache.path("lower", "k") and cache.warned == []


@pytest.mark.parametrize("fault, said", [
    (lambda f: f.joinpath("model.onnx").write_bytes(b"weightz"), "model.onnx does not match its sha256"),
    (lambda f: f.joinpath("part0", "model.onnx").unlink(), "part0/model.onnx is missing"),
    (lambda f: f.joinpath("extra.bin").write_bytes(b"?"), "extra.bin was not in it when it was written"),
    (lambda f: f.joinpath(DIGESTS).unlink(), "has no .digests.json"),
    (lambda f: f.joinpath(DIGESTS).write_text("{"), "cannot be read"),
])
def test_a_corrupt_entry_is_a_miss_removed_and_said_in_one_line(tmp_path, fault, said):
    cache = written(tmp_path, {"model.onnx": b"weights", "part0/model.onnx": b"part"})
    fault(cache.path("lower", "k"))
    assert cache.get("lower", "k") is None
    assert not cache.path("lower", "k").exists()
    (line,) = cache.warned
    assert line.startswith("cache entry lower/k was corrupt") and said in line


def built(tmp_path):
    """The small spec built into tmp_path/out: (spec, out)."""
    spec = tmp_path / "small.evc"
    spec.write_text(small_spec())
    out = tmp_path / "out"
    assert run_evc("build", spec, "--out", out).returncode == 0
    return spec, out


def flip(path, at: int, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[at:at + count] = bytes(b ^ 0xFF for b in data[at:at + count])
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_rotten_cached_onnx_is_rebuilt_and_the_bundle_matches_its_manifest(tmp_path):
    """The fault a user met: 64 bytes of a cached .onnx flipped, the bundle deleted, the spec rebuilt."""
    spec, out = built(tmp_path)
    (cached,) = (out / ".cache" / "lower").glob("*/model.onnx")
    flip(cached, cached.stat().st_size // 2)
    bundle = out / "small" / "cpu"
    subprocess.run(["rm", "-r", str(bundle)], check=True)
    done = run_evc("build", spec, "--out", out)
    assert done.returncode == 0, done.stderr
    assert f"cache entry lower/{cached.parent.name} was corrupt (model.onnx does not match its sha256)" in done.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    artifact = manifest["artifacts"][0]
    assert hashlib.sha256((bundle / artifact["path"]).read_bytes()).hexdigest() == artifact["sha256"]
    verified = run_evc("verify", bundle)
    assert verified.returncode == 0 and "ok" in verified.stdout
    assert not (bundle / DIGESTS).exists()  # the cache's record stays in the cache


@pytest.mark.slow
def test_evc_verify_names_each_file_that_differs_from_the_manifest_and_exits_1(tmp_path):
    _, out = built(tmp_path)
    bundle = out / "small" / "cpu"
    flip(bundle / "model.onnx", 100, 8)
    (bundle / "bench.py").unlink()
    done = run_evc("verify", bundle)
    assert done.returncode == 1
    assert "model.onnx: does not match the sha256 manifest.json records" in done.stderr
    assert "bench.py: missing" in done.stderr and "Traceback" not in done.stderr


def test_evc_verify_of_a_folder_that_is_no_bundle_exits_2(tmp_path):
    done = run_evc("verify", tmp_path)
    assert done.returncode == 2 and "not a bundle" in done.stderr


@pytest.mark.slow
def test_two_builds_of_one_spec_at_once_each_leave_a_whole_bundle(tmp_path):
    spec = tmp_path / "small.evc"
    spec.write_text(small_spec())
    out = tmp_path / "out"
    builds = [subprocess.Popen([sys.executable, "-m", "evc", "build", str(spec), "--out", str(out)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for build in builds:
        _, err = build.communicate(timeout=600)
        assert build.returncode == 0, err
    assert run_evc("verify", out / "small" / "cpu").returncode == 0
    assert not list((out / "small").glob(".*.tmp"))
