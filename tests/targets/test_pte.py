"""format = pte: ExecuTorch through XNNPACK, fp32 and int8, where each operator runs, parity, its bench scripts."""

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch.fx as torch_fx

from evc.bundle.scripts import render_scripts
from evc.bundle.write import _script_context
from evc.driver import build
from evc.errors import BuildError
from evc.registry import DEVICES
from evc.spec.check import parse_and_check
from evc.targets.android import benchmark_command
from evc.targets.pte import THRESHOLDS, Pte, latency_ms
from tests.conftest import run_evc, small_spec
from tests.targets.conftest import EFFICIENTFORMER, explained_placements, median_head_spec, stand_in_adb
from tests.targets.test_parse_executor_runner import OUTPUT

DEIT = 'timm("deit_tiny_patch16_224", img_size = 32, patch_size = 8, depth = 2, num_classes = 10)'


def build_spec(folder, source: str, size: int, targets: str) -> dict:
    text = (f"evc 1\nmodel m {{\n    source = {source}\n    input = image({size}, {size})\n}}\n"
            f"data calib {{ synthetic = 8 }}\n{targets}\n")
    spec = folder / "spec.evc"
    spec.write_text(text)
    return {r.target: r for r in build(parse_and_check(text, spec), folder / "out")}


@pytest.fixture(scope="module")
def deit(tmp_path_factory):
    """deit_tiny at 32 px, two blocks, random weights: fp32 on the cpu device, int8 on a phone."""
    return build_spec(tmp_path_factory.mktemp("pte_deit"), DEIT, 32, (
        "target cpu { device = cpu, format = pte, threads = [1, 2], runs = 3, warmups = 1 }\n"
        'target phone { device = android, format = pte, quantize = int8, calibrate = calib, threads = [1, 4], '
        'cores = "f0" }'))


@pytest.fixture(scope="module")
def efficientformer(tmp_path_factory):
    """int8 alone: its fp32 lowering differs only by the batch norms it keeps (docs/targets.md has both), and each
    lowering of it costs ExecuTorch some 10 s."""
    return build_spec(tmp_path_factory.mktemp("pte_efficientformer"), EFFICIENTFORMER, 224,
                      "target int8 { device = cpu, format = pte, quantize = int8, calibrate = calib }")


def artifact(result) -> dict:
    (only,) = result.manifest["artifacts"]
    return only


@pytest.mark.slow
def test_fp32_pte_matches_pytorch_within_1e_4_in_executorchs_runtime(deit):
    fp32 = artifact(deit["cpu"])
    assert fp32["path"] == "model.pte" and fp32["format"] == "pte" and fp32["quantize"] == "none"
    assert fp32["parity"]["max_abs_diff"] < 1e-4 and fp32["parity_thresholds"] == {"max_abs_diff": 1e-4}
    assert fp32["parity"]["top1_agreement"] == 1.0


@pytest.mark.slow
def test_xnnpack_takes_every_linear_matmul_softmax_and_gelu_of_a_vit_and_leaves_layernorm_portable(deit):
    for result in deit.values():
        placed = artifact(result)["delegation"]
        ops = placed["ops"]
        # Two blocks: qkv, proj, fc1, fc2 each, and the head; two attentions' q@k and attn@v.
        assert ops["aten.linear.default"] == {"delegated": 9, "portable": 0}
        assert ops["aten.bmm.default"] == {"delegated": 4, "portable": 0}
        assert ops["aten._softmax.default"] == {"delegated": 2, "portable": 0}
        assert ops["aten.gelu.default"] == {"delegated": 2, "portable": 0}
        assert ops["aten.convolution.default"] == {"delegated": 1, "portable": 0}
        # XNNPACK has no LayerNorm: two a block and the final norm stay in the portable kernels.
        assert ops["aten.native_layer_norm.default"] == {"delegated": 0, "portable": 5}
        assert placed["portable_ops"] == ["aten.expand_copy.default", "aten.native_layer_norm.default",
                                          "aten.select_copy.int", "aten.squeeze_copy.dims"]
        counted = [(op, n) for op, c in ops.items() if not op.startswith("quantized_decomposed.") for n in c.values()]
        assert placed["delegated"] + placed["portable"] == sum(n for _, n in counted)
        assert placed["partitions"] >= 6  # each portable LayerNorm splits the XNNPACK graph


@pytest.mark.slow
def test_delegation_json_names_every_portable_node_and_the_module_it_came_from(deit):
    placed = json.loads((deit["cpu"].bundle / "delegation.json").read_text())
    assert len(placed["portable_nodes"]) == placed["portable"] + placed["quantize_ops"]["portable"]
    norms = [n["module"] for n in placed["portable_nodes"] if n["op"] == "aten.native_layer_norm.default"]
    assert norms == ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2", "norm"]
    assert all(n["from"] for n in placed["portable_nodes"])  # the Program's node each one descends from
    readme = (deit["cpu"].bundle / "README.md").read_text()
    assert "| `aten.native_layer_norm.default` | 0 | 5 |" in readme and "12 XNNPACK partition(s)" in readme


@pytest.mark.slow  # 28 s here: ExecuTorch's import and one lowering
def test_placement_puts_a_vits_layernorms_and_token_ops_on_portable_kernels_writing_no_bundle():
    import timm

    from evc.ir.program import Program
    from evc.spec.plan import ImageInput

    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10)
    placement = Pte().placement(Program.from_module(model.eval(), ImageInput(32, 32)),
                                SimpleNamespace(params={"quantize": "none"}))
    # one block: its qkv, proj, fc1, fc2 and the head, two bmm, softmax, gelu, the patch conv, the adds...
    assert placement["summary"]["xnnpack"] >= 10
    # ...and LayerNorm, the class token's expand and select, the squeeze around the attention left portable
    off = placement["cpu"]
    assert placement["summary"]["portable"] == len(off) and placement["unsupported"] == []
    norms = [n["why"].split(", from ")[-1] for n in off if n["op"] == "aten.native_layer_norm.default"]
    assert norms == ["blocks.0.norm1", "blocks.0.norm2", "norm"]
    assert {n["on"] for n in off} == {"portable"}
    assert placement["march"].startswith("ExecuTorch ") and "quantize = none" in placement["march"]


@pytest.mark.slow
def test_explain_and_the_report_show_xnnpack_and_portable_operators_from_the_build(deit):
    placement = explained_placements(deit["cpu"].bundle)
    spec = deit["cpu"].bundle.parent.parent.parent / "spec.evc"
    for name in ("cpu", "phone"):
        placed = artifact(deit[name])["delegation"]
        assert placement[name]["summary"] == {"xnnpack": placed["delegated"], "portable": placed["portable"]}
        assert len(placement[name]["cpu"]) == placed["portable"]
    assert "quantize = int8" in placement["phone"]["march"]
    text = run_evc("explain", spec, "--out", spec.parent / "out")
    assert "operator check (ExecuTorch" in text.stdout and "(aten.native_layer_norm.default): portable" in text.stdout
    page = (deit["cpu"].bundle.parent / "report.html").read_text()
    assert "operators in XNNPACK&#39;s partitions" in page and "nodes off the XNNPACK" in page

@pytest.mark.slow
def test_int8_pte_is_a_third_of_fp32_every_quantize_op_is_delegated_and_it_passes_its_threshold(deit):
    fp32, int8 = artifact(deit["cpu"]), artifact(deit["phone"])
    assert int8["quantize"] == "int8" and int8["size"] < 0.35 * fp32["size"]
    assert int8["parity_thresholds"]["cosine"] == THRESHOLDS["int8"][0] <= int8["parity"]["cosine"]
    assert int8["parity_thresholds"]["top1_agreement"] is None  # random weights: not judged, and said why
    quantize = int8["delegation"]["quantize_ops"]
    assert quantize["delegated"] > 0 and quantize["portable"] == 0
    assert int8["delegation"]["ops"]["aten.linear.default"] == {"delegated": 9, "portable": 0}


@pytest.mark.slow
def test_a_hierarchical_models_conv_stages_and_attention_go_to_xnnpack_in_int8(efficientformer):
    int8 = artifact(efficientformer["int8"])
    assert int8["parity"]["cosine"] >= THRESHOLDS["int8"][0]
    placed = int8["delegation"]
    ops = placed["ops"]
    # 11 convolutions (stem 2, conv MLPs 6, downsamples 3) and 3 pooling mixers, all on XNNPACK
    assert ops["aten.convolution.default"] == {"delegated": 11, "portable": 0}
    assert ops["aten.avg_pool2d.default"] == {"delegated": 3, "portable": 0}
    assert ops["aten.linear.default"] == {"delegated": 6, "portable": 0}
    assert ops["aten._softmax.default"] == {"delegated": 1, "portable": 0}
    # the attention block's two LayerNorms and the final norm; the head's token mean
    assert ops["aten.native_layer_norm.default"] == {"delegated": 0, "portable": 3}
    assert ops["aten.mean.dim"] == {"delegated": 0, "portable": 1}
    # the quantizer folds batch norm into the convolutions, and every quantize op is delegated
    assert "aten._native_batch_norm_legit_no_training.default" not in ops
    assert placed["quantize_ops"]["portable"] == 0 and placed["partitions"] == 7


@pytest.mark.slow
def test_running_a_pte_gives_one_row_of_logits_per_image(deit):
    images = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    for result in deit.values():
        assert Pte().run(result.bundle / "model.pte", images).shape == (3, 10)


@pytest.mark.slow
def test_a_session_sets_xnnpacks_thread_pool_and_latency_ms_times_at_one_thread(deit):
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count

    path = deit["cpu"].bundle / "model.pte"
    Pte().session(path, 2)
    assert _threadpool_get_thread_count() == 2
    timed = latency_ms(path, runs=3, warmups=1)
    assert timed["threads"] == 1 and _threadpool_get_thread_count() == 1
    assert 0 < timed["median_ms"] <= timed["p90_ms"]


@pytest.mark.slow
def test_the_cpu_bench_script_times_the_pte_in_executorch_at_each_thread_count(deit, tmp_path):
    bundle = deit["cpu"].bundle
    assert "_unsafe_reset_threadpool" in (bundle / "README.md").read_text()
    assert artifact(deit["cpu"])["threads_set_by"].endswith("_unsafe_reset_threadpool")
    done = subprocess.run([sys.executable, "-I", str(bundle / "bench.py"), "--json", "--runs", "2"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["runtime"].startswith("executorch ") and [r["threads"] for r in result["results"]] == [1, 2]
    assert "Resetting threadpool to 2 threads" in done.stderr  # ExecuTorch's own word that the pool changed


def test_the_phone_runs_executor_runner_warmups_plus_runs_times_pinned_with_taskset():
    params = {"cores": "f0", "runs": 50, "warmups": 10}
    assert benchmark_command(params, "model.pte", 4) == [
        "taskset", "f0", "/data/local/tmp/evc/executor_runner", "--model_path=/data/local/tmp/evc/model.pte",
        "--cpu_threads=4", "--num_executions=60"]


@pytest.mark.slow
def test_the_android_bundle_carries_the_pte_the_runner_script_and_its_parser(deit):
    bundle = deit["phone"].bundle
    assert sorted(p.name for p in bundle.iterdir()) == [
        "README.md", "bench.sh", "delegation.json", "manifest.json", "model.pte", "parse_executor_runner.py"]
    readme = (bundle / "README.md").read_text()
    assert "-DEXECUTORCH_BUILD_XNNPACK=ON" in readme and "EXECUTORCH_ENABLE_LOGGING=ON" in readme
    assert "taskset f0" in readme and "quantize = int8" in readme
    done = subprocess.run(["shellcheck", str(bundle / "bench.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


@pytest.mark.slow
def test_spec_strings_rendered_into_the_runner_script_cannot_run_shell(deit, tmp_path):
    """Even past the checker, every value reaches bench.sh quoted: running it runs none of them."""
    marker = tmp_path / "injected"
    hostile = f"$(touch {marker})`touch {marker}`;touch {marker}"
    bundle = deit["phone"].bundle
    spec = bundle.parents[2] / "spec.evc"
    plan = parse_and_check(spec.read_text(), spec)
    phone = next(t for t in plan.targets if t.name == "phone")
    context = {**_script_context(plan, phone, deit["phone"].manifest, bundle),
               "cores": hostile, "serial": hostile, "artifact": hostile}
    render_scripts(DEVICES["android"], context, tmp_path)
    done = subprocess.run(["bash", str(tmp_path / "bench.sh")], capture_output=True, text=True,
                          env={"PATH": "/bin:/usr/bin", "EXECUTOR_RUNNER": str(tmp_path / "none")})
    assert done.returncode == 2 and "no executor_runner binary" in done.stderr and not marker.exists()


@pytest.mark.slow
def test_the_bench_script_pushes_the_runner_runs_each_thread_count_and_parses(deit, tmp_path):
    work = tmp_path / "bundle"
    subprocess.run(["cp", "-r", str(deit["phone"].bundle), str(work)], check=True)
    env, log = stand_in_adb(tmp_path, "executor_runner", OUTPUT)
    (work / "executor_runner").write_text("a binary for the phone\n")
    done = subprocess.run(["bash", str(work / "bench.sh"), "--serial", "R58M"], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert "-s R58M push model.pte /data/local/tmp/evc/model.pte" in calls
    assert "-s R58M push ./executor_runner /data/local/tmp/evc/executor_runner" in calls
    assert ("-s R58M shell taskset f0 /data/local/tmp/evc/executor_runner "
            "--model_path=/data/local/tmp/evc/model.pte --cpu_threads=4 --num_executions=60") in calls
    rows = [json.loads(line) for line in (work / "results" / "results.jsonl").read_text().splitlines()]
    # the stand-in's log has 5 iterations; the spec's 10 warm-ups leave none, so the total's average stands
    assert [r["threads"] for r in rows] == [1, 4] and rows[0]["executions"] == 5


@pytest.mark.slow
def test_bench_on_a_serial_no_adb_server_knows_exits_2(deit, adb_port):
    subprocess.run(["adb", "start-server"], check=True, capture_output=True)
    done = run_evc("bench", deit["phone"].bundle, "--serial", "R58M0000000")
    assert done.returncode == 2, done.stderr
    assert "no device 'R58M0000000' attached to the adb server" in done.stderr and "(attached: none)" in done.stderr
    assert "Traceback" not in done.stderr


def test_int8_without_calibrate_is_a_check_error_pointing_at_quantize(write_spec):
    spec = write_spec(small_spec("target t { device = android, format = pte, quantize = int8 }"))
    done = run_evc("check", spec)
    assert done.returncode == 2, done.stderr
    assert re.search(r"small\.evc:6:\d+: error: quantize = int8 needs calibrate", done.stderr)


def test_a_model_executorch_cannot_lower_fails_naming_the_node_with_exit_code_1(tmp_path):
    text = median_head_spec(tmp_path, "target t { device = cpu, format = pte }")
    spec = tmp_path / "median.evc"
    spec.write_text(text)
    with pytest.raises(BuildError) as failed:
        build(parse_and_check(text, spec), tmp_path / "out")
    assert failed.value.exit_code == 1  # what evc/cli.py exits with, printing the message alone
    assert str(failed.value).startswith(
        "target 't': lowering to pte failed: at node 'median' (Tensor.median): "
        "Operator torch._ops.aten.median.dim is not in Core ATen opset")


def refuse(x):
    raise RuntimeError("this kernel has no export")


torch_fx.wrap("refuse")  # a leaf of the traced graph: its node calls it when torch.export runs the graph


def test_an_export_that_fails_inside_the_graph_names_the_node_its_traceback_passed_through():
    import torch
    from torch import nn

    from evc.targets._executorch import LoweringFailed, lowered_module

    class Refusing(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 4, stride=4)

        def forward(self, x):
            return refuse(self.conv(x)).flatten(1)

    # The message names no operator: only the frame of the graph's own code says where it failed.
    with pytest.raises(LoweringFailed, match=r"^at node 'refuse' \(refuse\): this kernel has no export$"):
        lowered_module(torch_fx.symbolic_trace(Refusing()), (torch.randn(1, 3, 8, 8),))


@pytest.mark.slow
def test_int8_calibrated_on_flat_images_fails_before_lowering(tmp_path):
    from PIL import Image

    (tmp_path / "blank").mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32)).save(tmp_path / "blank" / f"{i}.png")
    text = small_spec("target t { device = cpu, format = pte, quantize = int8, calibrate = blank }",
                      extra='data blank { images = "blank" }\n')
    spec = tmp_path / "small.evc"
    spec.write_text(text)
    with pytest.raises(BuildError, match="calibrate = blank: all 2 images are flat"):
        build(parse_and_check(text, spec), tmp_path / "out")
