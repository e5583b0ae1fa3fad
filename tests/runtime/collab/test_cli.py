"""`evc serve` and `evc infer` as a user runs them: predictions printed, mistakes named with exit code 2,
a failed run with exit code 1, never a traceback."""

import json
import signal

import numpy as np
import pytest

from evc.runtime.collab.contract import read
from evc.runtime.collab.images import read_batch
from evc.runtime.collab.runtime import local_infer
from tests.conftest import run_evc, write_images
from tests.runtime.collab.conftest import START_S, Served, collab_of, free_port, images, variant, write_collab


def _fails(done, code: int) -> str:
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.startswith("error: ")
    return done.stderr


@pytest.mark.slow
def test_infer_prints_the_class_of_every_image_from_the_served_parts(bundles, serve, tmp_path):
    bundle = bundles["three"]
    x = images(3)
    np.save(tmp_path / "batch.npy", x)
    picture = next(write_images(tmp_path / "pictures", 1, height=40, width=50).iterdir())
    done = run_evc("infer", bundle, tmp_path / "batch.npy", picture, "--peers", ",".join(serve(bundle)), timeout=120)
    assert done.returncode == 0, done.stderr
    expected = [int(k) for k in local_infer(bundle, x).argmax(1)]
    expected.append(int(local_infer(bundle, read_batch(picture, read(bundle))).argmax()))
    names = [f"{tmp_path / 'batch.npy'}[{i}]" for i in range(3)] + [str(picture)]
    assert done.stdout.splitlines() == [f"{name}: class {k}" for name, k in zip(names, expected)]


def test_infer_json_marks_a_degraded_answer_and_names_the_missing_peer(bundles, serve, tmp_path):
    bundle = bundles["three"]
    x = images(2)
    np.save(tmp_path / "batch.npy", x)
    down = f"127.0.0.1:{free_port()}"
    peers = serve(bundle, parts=[0, 1]) + [down]
    done = run_evc("infer", bundle, tmp_path / "batch.npy", "--peers", ",".join(peers), "--deadline-ms", "500",
                   "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [row["class"] for row in rows] == [int(k) for k in local_infer(bundle, x, missing=(2,)).argmax(1)]
    assert all(row["degraded"] and row["missing"] == [down] for row in rows)
    assert rows[0]["reasons"][0].startswith(f"part 2 at {down}: unreachable")
    compute = rows[0]["parts_compute_ms"]
    assert compute[2] is None and all(0 < ms < rows[0]["batch_ms"] for ms in compute[:2])


def test_infer_with_a_part_down_and_no_degraded_answer_exits_1_naming_the_peer(bundles, serve, tmp_path):
    strict = variant(bundles["two"], tmp_path / "strict", degraded_ok=False)
    np.save(tmp_path / "batch.npy", images(1))
    down = f"127.0.0.1:{free_port()}"
    done = run_evc("infer", strict, tmp_path / "batch.npy", "--peers", f"{serve(strict, parts=[0])[0]},{down}",
                   "--deadline-ms", "500", timeout=120)
    assert _fails(done, 1).startswith(f"error: part 1 at {down}: unreachable")


@pytest.mark.parametrize("args, message", [
    (["--peers", "127.0.0.1"], "error: --peers: '127.0.0.1' is not HOST:PORT"),
    (["--peers", "127.0.0.1:1"], "has 2 parts, so it takes 2 peers"),
    (["--peers", "127.0.0.1:1,127.0.0.1:2", "--deadline-ms", "0"], "--deadline-ms 0: expected a positive number"),
])
def test_infer_refuses_bad_arguments_with_exit_2(bundles, tmp_path, args, message):
    np.save(tmp_path / "batch.npy", images(1))
    assert message in _fails(run_evc("infer", bundles["two"], tmp_path / "batch.npy", *args), 2)


@pytest.mark.slow
def test_infer_refuses_bad_input_files_with_exit_2(bundles, tmp_path):
    peers = ("--peers", "127.0.0.1:1,127.0.0.1:2")
    assert "no such bundle folder" in _fails(run_evc("infer", tmp_path / "absent", "x.npy", *peers), 2)
    np.save(tmp_path / "small.npy", np.zeros((2, 3, 16, 16), np.float32))
    assert "small.npy: expected images of shape (B, 3, 32, 32) float32 or uint8, received (2, 3, 16, 16)" in _fails(
        run_evc("infer", bundles["two"], tmp_path / "small.npy", *peers), 2)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert "cannot read image" in _fails(run_evc("infer", bundles["two"], tmp_path / "broken.png", *peers), 2)
    broken = variant(bundles["two"], tmp_path / "broken", degraded_ok="sometimes")
    assert 'fusion.degraded_ok: expected true or false, got "sometimes"' in _fails(
        run_evc("infer", broken, tmp_path / "small.npy", *peers), 2)


def test_serve_refuses_a_part_the_bundle_lacks_with_exit_2(bundles):
    done = run_evc("serve", bundles["two"], "--part", "2", "--port", "0")
    assert "--part 2: " in _fails(done, 2) and "has parts 0 to 1" in done.stderr


def test_serve_refuses_a_bundle_without_its_models_with_exit_2(bundles, tmp_path):
    write_collab(tmp_path, collab_of(bundles["two"]))
    done = run_evc("serve", tmp_path, "--part", "0", "--port", "0")
    assert "parts[0].model: no such file" in _fails(done, 2)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_cleanly_on_ctrl_c_and_sigterm(bundles, tmp_path, stop):
    served = Served(bundles["two"], 0, tmp_path / "serve.err")
    try:
        served.wait_started()
        served.process.send_signal(stop)
        assert served.process.wait(START_S) == 0
    finally:
        served.kill()
    err = (tmp_path / "serve.err").read_text()
    assert err == "stopped serving part 0\n"
