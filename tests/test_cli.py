"""The command line as a user runs it: build, explain, bench, --help, exit codes."""

import json
import shutil

import pytest

from tests.conftest import ROOT, run_evc, small_spec


@pytest.mark.slow
def test_the_readme_spec_builds_its_cpu_and_x5_targets(tmp_path):
    """specs/deit_tiny_x5.evc: the contract spec, compressed, for a CPU and for the RDK X5's BPU."""
    done = run_evc("build", ROOT / "specs" / "deit_tiny_x5.evc", "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    bundle = tmp_path / "deit_tiny_x5" / "cpu"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["source"] == "timm('deit_tiny_patch16_224')"
    assert manifest["structure"]["depth"] == 12 and manifest["structure"]["prefix_tokens"] == ["cls_token"]
    # torch.utils.flop_counter, with CPU attention counted: 1.254 G MACs, as an ONNX graph count gives.
    assert manifest["params_macs"]["before"]["total"]["macs"] == pytest.approx(1.2537e9, rel=1e-3)
    assert manifest["params_macs"]["before"]["total"]["params"] == 5_717_416
    # head_prune keep 2/3 of 3 heads, ffn_prune 70% of 768 rounded to a multiple of 8
    assert {(b["attn"]["num_heads"], b["mlp"]["hidden"]) for b in manifest["structure"]["blocks"]} == {(2, 536)}
    after = manifest["params_macs"]["after"]["total"]
    assert after["params"] < 0.75 * 5_717_416 and after["macs"] < 0.75 * 1.2537e9
    parity = manifest["artifacts"][0]["parity"]
    assert parity["max_abs_diff"] < 1e-4 and parity["top1_agreement"] == 1.0
    # The x5 bundle: the compressed model still has one Softmax per block, each on the BPU in int16.
    x5 = tmp_path / "deit_tiny_x5" / "x5"
    onnx_artifact, proxy = json.loads((x5 / "manifest.json").read_text())["artifacts"]
    assert onnx_artifact["ops"]["Softmax"] == 12 == len(onnx_artifact["node_info"])
    assert onnx_artifact["op_check"]["summary"]["unsupported"] == 0
    assert onnx_artifact["parity"]["max_abs_diff"] < 1e-4 and proxy["quantize"] == "int8"
    assert len(list((x5 / "calibration").iterdir())) == 64
    # Not on a terminal, a build says only what matters: the random weights, once.
    assert done.stderr.count("randomly initialised") == 1
    assert len(done.stderr.strip().splitlines()) == 1


def test_build_of_an_unknown_target_name_exits_2(write_spec, tmp_path):
    done = run_evc("build", write_spec(small_spec()), "--target", "gpu", "--out", tmp_path / "out")
    assert done.returncode == 2 and "has no such target (it has: cpu)" in done.stderr


@pytest.mark.slow
def test_explain_shows_structure_blocks_and_targets_and_writes_nothing(write_spec, tmp_path):
    spec = write_spec(small_spec())
    out = tmp_path / "out"
    done = run_evc("explain", spec, "--out", out)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "patches 8x8 on a 4x4 grid" in text
    assert "block 0: attn 3x64, mlp 768, 17 tokens" in text
    assert "params and MACs per block" in text and "total" in text
    assert "target cpu" in text and "ONNX" in text
    assert not out.exists()


@pytest.mark.slow
def test_bench_runs_the_generated_script_and_prints_latency(write_spec, tmp_path):
    spec = write_spec(small_spec())
    assert run_evc("build", spec, "--out", tmp_path / "out").returncode == 0
    bundle = tmp_path / "out" / "small" / "cpu"
    done = run_evc("bench", bundle, "--runs", "5", "--threads", "1", "2")
    assert done.returncode == 0, done.stderr
    assert "median ms" in done.stdout and "p90 ms" in done.stdout
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in done.stdout.splitlines()
            if line.strip().startswith("│") and "model.onnx" in line]
    assert [(r[0], r[1], r[4]) for r in rows] == [("model.onnx", "onnx", "1"), ("model.onnx", "onnx", "2")]
    assert all(float(r[5]) > 0 for r in rows) and rows[0][3].startswith("max|Δ|")


@pytest.mark.slow
def test_the_bench_script_runs_alone_in_a_copied_bundle(write_spec, tmp_path):
    """A bundle is self-contained: its script needs neither evc nor the build folder."""
    import subprocess
    import sys

    spec = write_spec(small_spec())
    assert run_evc("build", spec, "--out", tmp_path / "out").returncode == 0
    moved = shutil.copytree(tmp_path / "out" / "small" / "cpu", tmp_path / "elsewhere")
    done = subprocess.run([sys.executable, "-I", str(moved / "bench.py"), "--json", "--runs", "3"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [r["threads"] for r in result["results"]] == [1, __import__("os").cpu_count()]
    assert all(0 < r["median_ms"] <= r["p90_ms"] for r in result["results"])


def test_bench_of_a_folder_that_is_no_bundle_exits_2(tmp_path):
    done = run_evc("bench", tmp_path)
    assert done.returncode == 2 and "not a bundle" in done.stderr


@pytest.mark.parametrize("command", ["build", "check", "explain", "bench"])
def test_every_command_has_help(command):
    done = run_evc(command, "--help")
    assert done.returncode == 0 and "usage: evc " + command in done.stdout


@pytest.mark.parametrize("spec", sorted((ROOT / "specs").glob("*.evc")), ids=lambda p: p.name)
def test_every_example_spec_checks(spec):
    done = run_evc("check", spec)
    assert done.returncode == 0, done.stderr
