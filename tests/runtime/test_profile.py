"""Latency tables (evc profile) and latency budgets: a block's cost by heads and MLP width, timed here."""

import json

import numpy as np
import pytest
import timm
import torch

from evc.ir.latency import Table
from evc.ir.program import Program
from evc.passes.grid import Uniform
from evc.runtime.profile import measure
from evc.spec.plan import ImageInput
from evc.targets.onnx import export_onnx, session
from tests.conftest import check_fails, run_evc


def _lower(program, folder):
    export_onnx(program, folder / "model.onnx", 17)
    return folder / "model.onnx"


def _shaped(program, heads, units):
    """`program` with these heads and MLP units per block, by the passes a budget runs."""
    from evc.passes.ffn_prune import FfnPrune
    from evc.passes.head_prune import HeadPrune

    class PerBlock(Uniform):
        def __init__(self, keep):
            self.keep = keep

        def per_layer(self, key, depth):
            return self.keep

    narrow = HeadPrune().run(program, dict(keep=None, score="l1", scope="layer", min_heads=1, data=None),
                             PerBlock(tuple(h / 3 for h in heads)))
    return FfnPrune().run(narrow, dict(keep=None, score="l1", round_to=8, data=None),
                          PerBlock(tuple(u / 768 for u in units)))


@pytest.mark.slow
def test_the_table_predicts_held_back_configurations_within_15_percent():
    """Three models of uneven blocks, timed in the same turns as the table's own, against its prediction."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, patch_size=8, depth=6).eval()
    program = Program.from_module(model, ImageInput(64, 64))
    rng = np.random.default_rng(0)
    held_back = {f"config {i}": _shaped(program, rng.integers(1, 4, 6).tolist(),
                                        (rng.integers(1, 97, 6) * 8).tolist()) for i in range(3)}
    table, measured = measure(program, _lower, session, 1, 40, 5, alongside=held_back)
    assert table.heads == (1, 2, 3) and table.units == (96, 192, 384, 576, 768)
    assert table.base_ms > 0 and all(ms > 0 for row in table.block_ms for ms in row)
    for name, config in held_back.items():
        predicted = table.predict(config.structure)
        assert abs(predicted - measured[name]) <= 0.15 * measured[name], (name, predicted, measured[name])
    assert Table.from_dict(json.loads(json.dumps(table.to_dict()))) == table


def test_between_measured_points_a_block_is_interpolated():
    table = Table("cpu", "onnx", 1, 2, (1, 3), (8, 16), 1.0, ((1.0, 2.0), (3.0, 4.0)))
    assert table.block(1, 8) == 1.0 and table.block(3, 16) == 4.0
    assert table.block(2, 12) == pytest.approx(2.5)  # halfway in both
    assert table.block(3, 32) == 4.0  # beyond the grid: its edge


SPEC = """evc 1
model m {{
    source = timm("vit_tiny_patch16_224", img_size = 32, patch_size = 8, depth = 4, num_classes = 10)
    input  = image(32, 32, crop_pct = 1.0)
}}
data calib {{ synthetic = 8 }}
compress {{
    budget {{ {budget} }}
    head_prune {{ score = l1 }}
    ffn_prune {{ score = l1 }}
}}
target cpu {{ device = cpu, format = onnx, threads = 1, runs = 20, warmups = 3 }}
target phone {{ device = android, format = tflite }}
"""


@pytest.mark.slow
def test_a_latency_budget_is_searched_on_the_targets_table_and_timed_after_the_build(tmp_path):
    spec = tmp_path / "m.evc"
    spec.write_text(SPEC.format(budget="latency = 70%, on = cpu, data = calib, samples = 8"))
    done = run_evc("build", spec, "--out", tmp_path / "out", "--target", "cpu")
    assert done.returncode == 0, done.stderr
    budget = json.loads((tmp_path / "out" / "m" / "cpu" / "manifest.json").read_text())["budget"]
    assert budget["metric"] == "latency" and budget["on"] == "cpu"
    assert budget["target"] == pytest.approx(0.7 * budget["loaded_ms"])
    assert budget["reached"] <= budget["target"]  # as the table predicts it
    timed = budget["timed"]
    assert timed["predicted_ms"] == pytest.approx(budget["reached"]) and timed["measured_ms"] > 0
    assert timed["predicted_share"] <= 0.7 and timed["measured_share"] == pytest.approx(
        timed["measured_ms"] / timed["loaded_measured_ms"])  # the chosen and the loaded model timed together
    profile = run_evc("profile", spec, "--target", "cpu", "--out", tmp_path / "out", "--json")
    assert profile.returncode == 0, profile.stderr
    assert json.loads(profile.stdout) == budget["table"]  # the table the build searched on, from the cache


@pytest.mark.parametrize("budget, message", [
    ("latency = 12ms, data = calib", "a latency budget needs `on`"),
    ("latency = 12ms, on = cpx, data = calib", "undefined target 'cpx'"),
    ("latency = 600M, on = cpu, data = calib", "found 600M, a count"),
])
def test_a_latency_budget_that_cannot_be_timed_here_is_a_spec_error(tmp_path, budget, message):
    spec = tmp_path / "m.evc"
    spec.write_text(SPEC.format(budget=budget))
    stderr = check_fails(spec)
    assert message in stderr and "m.evc:8:" in stderr


def test_profile_names_a_target_it_cannot_time(tmp_path):
    spec = tmp_path / "m.evc"
    spec.write_text(SPEC.format(budget="macs = 50%, data = calib"))
    done = run_evc("profile", spec, "--target", "phone", "--out", tmp_path / "out")
    assert done.returncode == 2 and "--target phone is a phone: give --serial SERIAL" in done.stderr


@pytest.mark.slow
def test_a_phones_table_is_measured_over_adb_and_a_build_without_it_says_how(tmp_path):
    spec = tmp_path / "m.evc"
    spec.write_text(SPEC.format(budget="latency = 12ms, on = phone, data = calib"))
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "m.evc:8:" in done.stderr and "target 'phone' has no latency table yet" in done.stderr
    assert f"evc profile {spec} --target phone --serial SERIAL" in done.stderr
    binary = tmp_path / "benchmark_model"
    binary.write_text("")
    # a real adb server, with no phone attached
    profile = run_evc("profile", spec, "--target", "phone", "--serial", "emulator-5554", "--binary", binary,
                      "--out", tmp_path / "out")
    assert profile.returncode == 2 and "Traceback" not in profile.stderr
    assert "no device 'emulator-5554' attached" in profile.stderr


def _phone_spec(tmp_path, fmt: str):
    spec = tmp_path / "m.evc"
    spec.write_text(SPEC.format(budget="macs = 50%, data = calib").replace("format = tflite", f"format = {fmt}"))
    return spec


@pytest.mark.parametrize("fmt, tool", [("pte", "executor_runner"), ("tflite", "benchmark_model")])
def test_a_phones_profile_asks_for_the_tool_of_the_targets_format(tmp_path, fmt, tool):
    done = run_evc("profile", _phone_spec(tmp_path, fmt), "--target", "phone", "--out", tmp_path / "out")
    assert done.returncode == 2 and f"--binary, the {tool} built for its ABI" in done.stderr


@pytest.mark.slow
def test_a_pte_phones_profile_looks_for_executor_runner_when_no_binary_is_given(tmp_path):
    spec = _phone_spec(tmp_path, "pte")
    # no phone, and no tool in the folder it runs in: the default it looked for is named
    done = run_evc("profile", spec, "--target", "phone", "--serial", "R58M", "--out", tmp_path / "out", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--binary executor_runner: no such file" in done.stderr

BOARD_SPEC = """evc 1
model m {{
    source = timm("vit_tiny_patch16_224", img_size = 32, patch_size = 8, depth = 2, num_classes = 10)
    input  = image(32, 32, crop_pct = 1.0)
}}
data calib {{ synthetic = 8 }}
compress {{
    budget {{ latency = 60%, on = orin, data = calib, samples = 8 }}
    head_prune {{ score = l1 }}
    ffn_prune {{ score = l1 }}
}}
target orin {{ device = jetson, format = onnx }}
"""


def _trtexec_log(median_ms: float) -> str:
    from tests.targets.test_jetson import TRTEXEC

    return TRTEXEC.replace("median = 1.91895 ms", f"median = {median_ms:.5f} ms")


@pytest.mark.slow
def test_a_boards_table_comes_from_a_kit_its_scripts_ran_on_the_board(tmp_path):
    """For a Jetson: the grid's bundles and profile.sh, then the logs read back into the table a budget reads."""
    import shutil
    import subprocess

    spec, out = tmp_path / "m.evc", tmp_path / "out"
    spec.write_text(BOARD_SPEC.format())
    done = run_evc("build", spec, "--out", out)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "m.evc:8:" in done.stderr and "target 'orin' has no latency table yet" in done.stderr
    assert f"evc profile {spec} --target orin" in done.stderr

    made = run_evc("profile", spec, "--target", "orin", "--out", out)
    assert made.returncode == 0, made.stderr
    kit = out / "m" / "profile-orin"
    assert f"run `evc profile {spec} --target orin --results {kit}`" in made.stdout
    record = json.loads((kit / "profile.json").read_text())
    grid = [(m["heads"], m["units"]) for m in record["models"] if m["folder"] != "one"]
    assert grid == [(h, u) for h in (1, 2, 3) for u in (96, 192, 384, 576, 768)]
    for model in record["models"]:  # each a bundle as `evc build` makes the target's: checked, with bench.sh
        manifest = json.loads((kit / model["folder"] / "manifest.json").read_text())
        assert manifest["target"]["device"] == "jetson" and (kit / model["folder"] / "bench.sh").is_file()
        assert manifest["artifacts"][0]["parity"]["max_abs_diff"] < 1e-4  # checked against PyTorch
    blocks = json.loads((kit / "heads2_units192" / "manifest.json").read_text())["structure"]["blocks"]
    assert [(b["attn"]["num_heads"], b["mlp"]["hidden"]) for b in blocks] == [(2, 192)] * 2
    if shutil.which("shellcheck"):
        assert subprocess.run(["shellcheck", kit / "profile.sh"]).returncode == 0
    usage = subprocess.run(["bash", kit / "profile.sh"], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: ./profile.sh board" in usage.stderr

    def block_ms(heads, units):  # what the "board" logs: a base of 0.5 ms and blocks of this cost
        return 0.1 * heads + 0.001 * units

    for model in record["models"]:
        ms = 0.5 + (block_ms(3, 768) if model["folder"] == "one" else 2 * block_ms(model["heads"], model["units"]))
        (kit / model["folder"] / "results").mkdir()
        (kit / model["folder"] / "results" / "trtexec.log").write_text(_trtexec_log(ms))
    read = run_evc("profile", spec, "--target", "orin", "--out", out, "--results", kit, "--json")
    assert read.returncode == 0, read.stderr
    table = Table.from_dict(json.loads(read.stdout))
    assert table.base_ms == pytest.approx(0.5, abs=1e-4) and table.runtime == "onnx on the jetson"
    for h, row in zip(table.heads, table.block_ms):
        assert row == pytest.approx([block_ms(h, u) for u in table.units], abs=1e-4)

    built = run_evc("build", spec, "--out", out)  # the budget now reads the table brought back
    assert built.returncode == 0, built.stderr
    budget = json.loads((out / "m" / "orin" / "manifest.json").read_text())["budget"]
    assert budget["on"] == "orin" and budget["reached"] <= budget["target"] == pytest.approx(0.6 * budget["loaded_ms"])
    assert budget["loaded_ms"] == pytest.approx(0.5 + 2 * block_ms(3, 768), abs=1e-3)

    (kit / "heads2_units384" / "results" / "trtexec.log").unlink()
    missing = run_evc("profile", spec, "--target", "orin", "--out", out, "--results", kit)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert f"{kit / 'heads2_units384' / 'results' / 'trtexec.log'}: no trtexec log" in missing.stderr


def test_the_x5_reads_hrt_model_execs_log_at_the_tables_thread_count(tmp_path):
    from evc.errors import InputError
    from evc.registry import DEVICES, load_plugins
    from tests.targets.test_parse_hrt import FOUR_THREADS, ONE_THREAD

    load_plugins()
    x5 = DEVICES["rdk_x5"].plugin
    assert [where for where, _ in x5.steps] == ["pc", "board"]  # hb_mapper on a PC, hrt_model_exec on the board
    (tmp_path / "perf_threads_1.log").write_text(ONE_THREAD)
    (tmp_path / "perf_threads_4.log").write_text(FOUR_THREADS)
    assert x5.latency_ms(tmp_path, 1) == pytest.approx(8.571925)
    assert x5.latency_ms(tmp_path, 4) == pytest.approx(16.090725)
    with pytest.raises(InputError, match=r"perf_threads_2\.log: no hrt_model_exec log"):
        x5.latency_ms(tmp_path, 2)
    (tmp_path / "perf_threads_1.log").write_text("hrt_model_exec: model file not found\n")
    with pytest.raises(InputError, match=r"perf_threads_1\.log: no hrt_model_exec perf result found"):
        x5.latency_ms(tmp_path, 1)
