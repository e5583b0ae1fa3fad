"""device = android: the bundle, its adb + benchmark_model script, and `evc bench --serial` against a real adb."""

import json
import os
import subprocess

import pytest

from evc.bundle.scripts import render_scripts
from evc.bundle.write import _script_context
from evc.driver import build
from evc.registry import DEVICES
from evc.spec.check import parse_and_check
from evc.targets.android import benchmark_command
from tests.conftest import ROOT, run_evc, small_spec
from tests.targets.conftest import ADB_PORT, stand_in_adb
from tests.targets.test_parse_benchmark_model import OUTPUT

PHONE = 'target phone { device = android, format = tflite, quantize = dynamic, threads = [1, 4], cores = "f0" }'


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("android")
    spec = folder / "small.evc"
    spec.write_text(small_spec(PHONE))
    (result,) = build(parse_and_check(spec.read_text(), spec), folder / "out")
    return result


@pytest.mark.slow
def test_the_bundle_carries_the_model_the_script_the_parser_and_the_readme(bundle):
    names = sorted(p.name for p in bundle.bundle.iterdir())
    assert names == ["README.md", "bench.sh", "manifest.json", "model.tflite", "parse_benchmark_model.py"]
    readme = (bundle.bundle / "README.md").read_text()
    assert "android_aarch64_benchmark_model" in readme and "taskset f0" in readme
    assert "no Flex delegate is needed" in readme


@pytest.mark.slow
def test_the_bench_script_passes_shellcheck(bundle):
    done = subprocess.run(["shellcheck", str(bundle.bundle / "bench.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_the_phone_runs_benchmark_model_pinned_with_taskset():
    params = {"cores": "f0", "runs": 50, "warmups": 10}
    assert benchmark_command(params, "model.tflite", 4) == [
        "taskset", "f0", "/data/local/tmp/evc/benchmark_model", "--graph=/data/local/tmp/evc/model.tflite",
        "--num_threads=4", "--num_runs=50", "--warmup_runs=10"]
    assert benchmark_command({**params, "cores": None}, "model.tflite", 1, runs=5)[0] == "/data/local/tmp/evc/benchmark_model"


@pytest.mark.parametrize("entry", ['cores = "f0; reboot"', 'serial = "x$(reboot)"', "threads = 0"])
def test_a_value_that_is_no_mask_serial_or_count_is_a_spec_error(write_spec, entry):
    spec = write_spec(small_spec(f"target phone {{ device = android, format = tflite, {entry} }}"))
    done = run_evc("check", spec)
    assert done.returncode == 2 and "target phone" not in done.stdout
    assert entry.split(" =")[0] in done.stderr


@pytest.mark.slow
def test_spec_strings_rendered_into_the_script_cannot_run_shell(bundle, tmp_path):
    """Even past the checker, every value reaches bench.sh quoted: running it runs none of them."""
    marker = tmp_path / "injected"
    hostile = f"$(touch {marker})`touch {marker}`;touch {marker}"
    plan = parse_and_check(small_spec(PHONE), tmp_path / "small.evc")
    context = {**_script_context(plan, plan.targets[0], bundle.manifest, bundle.bundle),
               "cores": hostile, "serial": hostile, "artifact": hostile}
    render_scripts(DEVICES["android"], context, tmp_path)
    done = subprocess.run(["bash", str(tmp_path / "bench.sh")], capture_output=True, text=True,
                          env={"PATH": "/bin:/usr/bin", "BENCHMARK_MODEL": str(tmp_path / "none")})
    assert done.returncode == 2 and not marker.exists()


@pytest.mark.slow
def test_the_bench_script_says_plainly_what_is_missing(bundle, tmp_path):
    script = str(bundle.bundle / "bench.sh")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "dirname").symlink_to(subprocess.run(["which", "dirname"], capture_output=True,
                                                             text=True).stdout.strip())
    no_adb = subprocess.run(["/bin/bash", script], capture_output=True, text=True, env={"PATH": str(tmp_path / "bin")})
    assert no_adb.returncode == 2 and "adb not found" in no_adb.stderr
    no_binary = subprocess.run(["/bin/bash", script], capture_output=True, text=True,
                               env={"PATH": os.environ["PATH"], "BENCHMARK_MODEL": str(tmp_path / "none")})
    assert no_binary.returncode == 2 and "no benchmark_model binary" in no_binary.stderr


@pytest.mark.slow
def test_the_bench_script_pushes_runs_each_thread_count_and_parses(bundle, tmp_path):
    work = tmp_path / "bundle"
    subprocess.run(["cp", "-r", str(bundle.bundle), str(work)], check=True)
    env, log = stand_in_adb(tmp_path, "benchmark_model", OUTPUT)
    (work / "benchmark_model").write_text("a binary for the phone\n")
    done = subprocess.run(["bash", str(work / "bench.sh"), "--serial", "R58M", "--profile"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert "-s R58M push model.tflite /data/local/tmp/evc/model.tflite" in calls
    assert ("-s R58M shell taskset f0 /data/local/tmp/evc/benchmark_model --graph=/data/local/tmp/evc/model.tflite "
            "--num_threads=4 --num_runs=50 --warmup_runs=10 --enable_op_profiling=true "
            "--op_profiling_output_mode=csv --op_profiling_output_file=/data/local/tmp/evc/op_profile.csv") in calls
    assert "-s R58M pull /data/local/tmp/evc/op_profile.csv results/op_profile.t4.csv" in calls
    rows = [json.loads(line) for line in (work / "results" / "results.jsonl").read_text().splitlines()]
    assert [r["threads"] for r in rows] == [1, 4] and rows[1]["inference_avg_ms"] == 47.4403


@pytest.mark.slow
def test_bench_on_a_serial_no_adb_server_knows_exits_2(bundle, adb_port):
    subprocess.run(["adb", "start-server"], check=True, capture_output=True)
    done = run_evc("bench", bundle.bundle, "--serial", "R58M0000000")
    assert done.returncode == 2, done.stderr
    assert "no device 'R58M0000000' attached to the adb server" in done.stderr and "(attached: none)" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_bench_on_a_serial_with_no_adb_server_and_no_adb_to_start_one_exits_2(bundle, adb_port, monkeypatch):
    subprocess.run(["adb", "kill-server"], capture_output=True)
    monkeypatch.setenv("ADBUTILS_ADB_PATH", "/nonexistent/adb")
    done = run_evc("bench", bundle.bundle, "--serial", "R58M0000000")
    assert done.returncode == 2, done.stderr
    assert f"no adb server at 127.0.0.1:{ADB_PORT}, and adb could not start one" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_bench_without_a_serial_times_the_model_here_in_litert(bundle):
    done = run_evc("bench", bundle.bundle, "--runs", "3")
    assert done.returncode == 0, done.stderr
    assert [line.split("│")[5].strip() for line in done.stdout.splitlines() if "model.tflite" in line] == ["1", "4"]


@pytest.mark.slow
def test_the_android_spec_builds_on_a_fresh_machine(tmp_path):
    spec = ROOT / "specs" / "deit_small_android.evc"
    done = run_evc("build", spec, "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "deit_small_android" / "phone" / "manifest.json").read_text())
    (artifact,) = manifest["artifacts"]
    assert artifact["quantize"] == "dynamic" and artifact["needs_flex"] is False
    assert artifact["parity"]["cosine"] >= artifact["parity_thresholds"]["cosine"] == 0.99
    assert artifact["size"] < 20e6  # int8 weights: about a quarter of the pruned model's fp32 size
    assert manifest["target"]["params"]["cores"] == "f0" and manifest["target"]["params"]["threads"] == [4]
    assert subprocess.run(["shellcheck", str(tmp_path / "deit_small_android" / "phone" / "bench.sh")]).returncode == 0
