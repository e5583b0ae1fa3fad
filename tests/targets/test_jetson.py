"""device = jetson: the ONNX bundle, its trtexec/tegrastats script, and the parsers of their logs."""

import json
import subprocess
import sys

import pytest

from evc.driver import build
from evc.spec.check import parse_and_check
from evc.targets.payload.parse_trtexec import energy, main, parse_tegrastats, parse_trtexec
from tests.conftest import small_spec

# The performance summary of a real trtexec run (TensorRT 8.6 on a Jetson Orin).
TRTEXEC = """\
[11/22/2026-01:00:01] [I] === Performance summary ===
[11/22/2026-01:00:01] [I] Throughput: 512.345 qps
[11/22/2026-01:00:01] [I] Latency: min = 1.85596 ms, max = 2.43225 ms, mean = 1.92872 ms, median = 1.91895 ms, percentile(90%) = 1.97852 ms, percentile(95%) = 2.00977 ms, percentile(99%) = 2.14648 ms
[11/22/2026-01:00:01] [I] Enqueue Time: min = 0.35791 ms, max = 0.6377 ms, mean = 0.39402 ms, median = 0.38867 ms, percentile(90%) = 0.41357 ms, percentile(95%) = 0.42676 ms, percentile(99%) = 0.50049 ms
[11/22/2026-01:00:01] [I] H2D Latency: min = 0.06543 ms, max = 0.08984 ms, mean = 0.06924 ms, median = 0.06885 ms, percentile(90%) = 0.07129 ms, percentile(95%) = 0.07227 ms, percentile(99%) = 0.07617 ms
[11/22/2026-01:00:01] [I] GPU Compute Time: min = 1.67041 ms, max = 2.2373 ms, mean = 1.72845 ms, median = 1.71826 ms, percentile(90%) = 1.77246 ms, percentile(95%) = 1.79932 ms, percentile(99%) = 1.93457 ms
[11/22/2026-01:00:01] [I] D2H Latency: min = 0.00732 ms, max = 0.04785 ms, mean = 0.01103 ms, median = 0.01025 ms, percentile(90%) = 0.01367 ms, percentile(95%) = 0.01465 ms, percentile(99%) = 0.02051 ms
[11/22/2026-01:00:01] [I] Total Host Walltime: 3.00351 s
[11/22/2026-01:00:01] [I] Total GPU Compute Time: 2.65627 s
&&&& PASSED TensorRT.trtexec [TensorRT v8601] # trtexec --onnx=model.onnx --fp16
"""

# tegrastats lines from a Jetson Orin Nano (mW rails) and a Xavier NX (bare numbers).
ORIN = """\
11-22-2026 01:00:00 RAM 2448/7772MB (lfb 2x4MB) SWAP 0/3886MB (cached 0MB) CPU [12%@1510,8%@1510,off,off] GR3D_FREQ 99% cpu@52.1C VDD_IN 7100mW/7000mW VDD_CPU_GPU_CV 2500mW/2400mW VDD_SOC 1500mW/1500mW
11-22-2026 01:00:00 RAM 2450/7772MB (lfb 2x4MB) SWAP 0/3886MB (cached 0MB) CPU [10%@1510,9%@1510,off,off] GR3D_FREQ 98% cpu@52.3C VDD_IN 6900mW/7000mW VDD_CPU_GPU_CV 2300mW/2400mW VDD_SOC 1500mW/1500mW
"""
ORIN_IDLE = "RAM 2400/7772MB SWAP 0/3886MB CPU [1%@1510,0%@1510,off,off] VDD_IN 4000mW/4000mW VDD_SOC 1400mW/1400mW\n"
XAVIER = "RAM 3000/7772MB SWAP 0/3886MB CPU [5%@1190] GR3D_FREQ 90% POM_5V_IN 5600/5500 POM_5V_GPU 2000/1900 POM_5V_CPU 900/900\n"


def test_trtexec_summary_is_parsed_into_latency_and_throughput():
    result = parse_trtexec(TRTEXEC)
    assert result["throughput_qps"] == 512.345
    assert result["latency_ms"] == {"min": 1.85596, "max": 2.43225, "mean": 1.92872, "median": 1.91895,
                                    "p90": 1.97852, "p95": 2.00977, "p99": 2.14648}
    assert result["gpu_compute_ms"]["median"] == 1.71826
    assert result["h2d_ms"]["mean"] == 0.06924 and result["host_walltime_s"] == 3.00351


def test_an_unfinished_trtexec_log_is_an_error():
    with pytest.raises(ValueError, match="Throughput"):
        parse_trtexec("[I] Building engine...\n")


def test_tegrastats_rails_are_averaged_per_rail():
    rails = parse_tegrastats(ORIN)
    assert rails == {"VDD_IN": 7000.0, "VDD_CPU_GPU_CV": 2400.0, "VDD_SOC": 1500.0}
    assert parse_tegrastats(XAVIER)["POM_5V_IN"] == 5600.0


def test_energy_per_inference_is_board_input_power_over_throughput():
    result = energy(parse_trtexec(TRTEXEC), parse_tegrastats(ORIN), parse_tegrastats(ORIN_IDLE))
    assert result["rail"] == "VDD_IN"
    assert result["energy_per_inference_mj"] == pytest.approx(7000 / 512.345)
    assert result["energy_above_idle_mj"] == pytest.approx(3000 / 512.345)


def test_the_parser_runs_as_a_script_and_exits_2_on_a_bad_log(tmp_path, capsys):
    (tmp_path / "t.log").write_text(TRTEXEC)
    (tmp_path / "p.log").write_text(XAVIER)
    assert main([str(tmp_path / "t.log"), "--power", str(tmp_path / "p.log")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["energy"]["rail"] == "POM_5V_IN"
    (tmp_path / "bad.log").write_text("nothing\n")
    assert main([str(tmp_path / "bad.log")]) == 2


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jetson")
    spec = folder / "small.evc"
    spec.write_text(small_spec("target orin { device = jetson, format = onnx, precision = int8 }"))
    (result,) = build(parse_and_check(spec.read_text(), spec), folder / "out")
    return result


def test_the_bundle_carries_the_checked_onnx_the_script_and_the_parser(bundle):
    names = sorted(p.name for p in bundle.bundle.iterdir())
    assert names == ["README.md", "bench.sh", "manifest.json", "model.onnx", "parse_trtexec.py"]
    assert bundle.manifest["artifacts"][0]["parity"]["max_abs_diff"] < 1e-4
    script = (bundle.bundle / "bench.sh").read_text()
    assert "PRECISION=int8" in script and "--int8 --fp16" in script
    assert "placeholder scales" in (bundle.bundle / "README.md").read_text()


def test_the_bench_script_passes_shellcheck(bundle):
    done = subprocess.run(["shellcheck", str(bundle.bundle / "bench.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_the_bench_script_says_plainly_when_trtexec_is_missing(bundle, tmp_path):
    done = subprocess.run(["bash", str(bundle.bundle / "bench.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "TRTEXEC": str(tmp_path / "none")})
    assert done.returncode == 2 and "trtexec not found" in done.stderr


def test_the_bundled_parser_runs_alone_with_the_standard_library(bundle, tmp_path):
    (tmp_path / "trtexec.log").write_text(TRTEXEC)
    done = subprocess.run([sys.executable, "-I", str(bundle.bundle / "parse_trtexec.py"),
                           str(tmp_path / "trtexec.log")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["trtexec"]["throughput_qps"] == 512.345


def test_the_jetson_spec_checks():
    from tests.conftest import ROOT

    plan = parse_and_check((ROOT / "specs" / "deit_tiny_jetson.evc").read_text(), ROOT / "specs" / "deit_tiny_jetson.evc")
    assert plan.targets[0].params["precision"] == "fp16"
