"""device = rdk_x5: its operator table, its scripts, and the full-size models the issue names."""

import json
import os
import re
import subprocess

import onnx
import pytest
import yaml

from evc.bundle.scripts import render_scripts, templates_root
from evc.bundle.write import _script_context
from evc.driver import build
from evc.registry import DEVICES, load_plugins
from evc.spec.check import parse_and_check
from tests.conftest import ROOT
from tests.targets.test_parse_hrt import FOUR_THREADS, ONE_THREAD

load_plugins()
X5 = DEVICES["rdk_x5"]
from evc.targets._bpu_ops import _LIMITS  # noqa: E402  (registered by load_plugins)

DEIT = """evc 1
model deit_tiny {
    source = timm("deit_tiny_patch16_224")
    input  = image(224, 224, mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225])
}
data calib { synthetic = 8 }
target x5 { device = rdk_x5, format = bpu, quantize = int8, calibrate = calib }
"""
LAYER_NORM = {"ReduceMean", "Sub", "Pow", "Sqrt", "Div"}  # LayerNormalization and Gelu do not exist at opset 11
GELU = {"Div", "Erf", "Add", "Mul"}


def build_text(path, text):
    path.write_text(text)
    (result,) = build(parse_and_check(text, path), path.parent / "out")
    return result


@pytest.fixture(scope="module")
def deit(tmp_path_factory):
    """deit_tiny_patch16_224 with no compress block, lowered to bpu."""
    return build_text(tmp_path_factory.mktemp("deit") / "deit_x5.evc", DEIT)


@pytest.fixture(scope="module")
def efficientvit(tmp_path_factory):
    """specs/efficientvit_m5_x5.evc as it is, built into a temporary folder."""
    text = (ROOT / "specs" / "efficientvit_m5_x5.evc").read_text()
    return build_text(tmp_path_factory.mktemp("m5") / "efficientvit_m5_x5.evc", text)


def softmax_names(bundle):
    return [n.name for n in onnx.load(bundle / "model.onnx").graph.node if n.op_type == "Softmax"]


def node_info(bundle):
    return yaml.safe_load((bundle / "config.yaml").read_text())["model_parameters"]["node_info"]


# ---- the profile and its operator table ---------------------------------------------------------

def test_rdk_x5_takes_bpu_and_declares_its_bench_keys():
    assert X5.formats == ("bpu",) and X5.files == ("parse_hrt.py",)
    assert {p.name: p.default for p in X5.params} == {"threads": (1, 4), "frame_count": 200}
    assert X5.facts["march"] == "bayes-e" and X5.facts["onnx"]["opset"] == 11


def test_every_op_of_the_table_has_a_known_placement_and_only_limits_the_check_reads():
    informational = {"on", "int16", "runs_as"}
    for op, rule in X5.facts["ops"].items():
        assert rule["on"] in {"bpu", "bpu_with_node_info", "cpu", "unsupported", "folded"}, op
        assert set(rule) - informational <= set(_LIMITS), op


def test_the_table_puts_softmax_on_the_bpu_only_through_node_info_and_layer_norm_and_gelu_on_the_bpu():
    ops = X5.facts["ops"]
    assert ops["Softmax"] == {"on": "bpu_with_node_info", "rank": [4, 4]}
    assert X5.facts["node_info"]["setting"] == {"ON": "BPU", "InputType": "int16", "OutputType": "int16"}
    assert {ops[op]["on"] for op in LAYER_NORM | GELU} == {"bpu"}
    assert "LayerNormalization" not in ops and "Gelu" not in ops
    assert (ops["Where"]["on"], ops["Einsum"]["on"]) == ("cpu", "unsupported")


# ---- deit_tiny, no compress block ---------------------------------------------------------------

@pytest.mark.slow
def test_deit_tiny_puts_all_12_softmax_nodes_of_its_model_onnx_in_node_info(deit):
    names = softmax_names(deit.bundle)
    assert len(names) == 12
    assert list(node_info(deit.bundle)) == names


@pytest.mark.slow
def test_deit_tiny_layer_norm_and_gelu_export_at_opset_11_as_elementary_ops_on_the_bpu(deit):
    artifact = deit.manifest["artifacts"][0]
    assert artifact["opset"] == 11
    assert LAYER_NORM | GELU <= set(artifact["ops"]) and not {"LayerNormalization", "Gelu"} & set(artifact["ops"])
    report = json.loads((deit.bundle / "op_check.json").read_text())
    assert {n["on"] for n in report["nodes"] if n["op"] in LAYER_NORM | GELU | {"Softmax", "MatMul", "Gemm"}} == {
        "bpu"}


@pytest.mark.slow
def test_deit_tiny_runs_every_node_on_the_bpu_with_no_tensor_above_4d(deit):
    """Exported as timm writes it, 12 q/k/v Splits along axis 0 of a 5-D tensor went to the CPU, one per block;
    lowered as three projections per block, none does (test_bpu_native.py checks each rewrite)."""
    check = deit.manifest["artifacts"][0]["op_check"]
    assert check["summary"]["unsupported"] == 0 and check["summary"]["cpu"] == 0
    model = onnx.shape_inference.infer_shapes(onnx.load(deit.bundle / "model.onnx"))
    assert max(len(v.type.tensor_type.shape.dim) for v in model.graph.value_info) == 4
    assert not {"Split", "Squeeze"} & {n.op_type for n in model.graph.node}


@pytest.mark.slow
def test_deit_tiny_float_parity_holds_and_its_int8_proxy_is_reported(deit):
    onnx_artifact, proxy = deit.manifest["artifacts"]
    assert onnx_artifact["parity"]["max_abs_diff"] < 1e-4
    assert 0 < proxy["parity"]["cosine"] <= 1 and proxy["parity"]["samples"] == 8
    assert proxy["gate"]["applied"] is False


# ---- efficientvit_m5, the model zoo's -----------------------------------------------------------

@pytest.mark.slow
def test_efficientvit_m5_puts_one_softmax_per_remaining_head_of_its_cascaded_group_attention_in_node_info(
        efficientvit):
    blocks = efficientvit.manifest["structure"]["blocks"]
    heads = [b["attn"]["num_heads"] for b in blocks if b["attn"]]
    assert heads == [2] * 8  # 3, 3, 3, 3, 4, 4, 4, 4 heads before head_prune { keep = 1/2 }
    names = softmax_names(efficientvit.bundle)
    assert len(names) == sum(heads)
    assert list(node_info(efficientvit.bundle)) == names


@pytest.mark.slow
def test_efficientvit_m5_softmax_inputs_are_4d_and_all_its_ops_run_on_the_bpu(efficientvit):
    model = onnx.shape_inference.infer_shapes(onnx.load(efficientvit.bundle / "model.onnx"))
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in model.graph.value_info}
    assert {ranks[n.input[0]] for n in model.graph.node if n.op_type == "Softmax"} == {4}
    check = efficientvit.manifest["artifacts"][0]["op_check"]
    assert check["summary"]["unsupported"] == 0
    assert check["cpu"] == []  # the head's BatchNormalization on (1, C) runs on (1, C, 1, 1)


@pytest.mark.slow
def test_efficientvit_m5_int8_proxy_stays_close_to_pytorch(efficientvit):
    onnx_artifact, proxy = efficientvit.manifest["artifacts"]
    assert onnx_artifact["parity"]["cosine"] > 0.99999
    assert proxy["parity"]["cosine"] > 0.999  # 0.9996 on any host: the proxy's QDQ runs in float
    assert onnx_artifact["toolchain"]["calibration_samples"] == 64


@pytest.mark.slow
def test_pruning_efficientvit_m5_puts_no_more_nodes_on_the_cpu(efficientvit, tmp_path):
    text = (ROOT / "specs" / "efficientvit_m5_x5.evc").read_text()
    compress = text[text.index("compress {"):text.index("target x5")]
    unpruned = build_text(tmp_path / "m5.evc", text.replace(compress, "").replace("synthetic = 64", "synthetic = 8"))
    before = unpruned.manifest["artifacts"][0]["op_check"]
    after = efficientvit.manifest["artifacts"][0]["op_check"]
    assert len(softmax_names(unpruned.bundle)) == 28
    assert after["summary"]["cpu"] <= before["summary"]["cpu"] and after["summary"]["unsupported"] == 0
    assert after["summary"]["bpu"] < before["summary"]["bpu"]  # the removed heads' convs and softmaxes are gone


# ---- the scripts --------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_generated_scripts_pass_shellcheck(deit, efficientvit):
    for bundle in (deit.bundle, efficientvit.bundle):
        done = subprocess.run(["shellcheck", "build.sh", "bench.sh"], cwd=bundle, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout


def test_every_value_a_script_template_prints_outside_a_comment_is_shell_quoted():
    for template in (templates_root() / "rdk_x5").glob("*.sh.j2"):
        for line in template.read_text().splitlines():
            for value in re.findall(r"{{(.*?)}}", line):
                comment = line.lstrip().startswith("#")
                assert value.strip().endswith("| sh") or comment, f"{template.name}: {line}"


def fake(folder, name, script):
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + script)
    path.chmod(0o755)


@pytest.fixture
def hostile(deit, tmp_path):
    """deit's scripts rendered anew with values that would run commands if a script failed to quote them."""
    evil = "$(touch PWNED)'; touch PWNED #"
    manifest = json.loads((deit.bundle / "manifest.json").read_text())
    toolchain = manifest["artifacts"][0]["toolchain"]
    toolchain.update(output=f"model_output/{evil}.bin", config=f"{evil}.yaml", march=f"bayes-e {evil}")
    plan = parse_and_check(DEIT, "deit.evc")
    target = plan.targets[0]
    target.params.update(threads=(1, evil), frame_count=f"7 {evil}")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    render_scripts(X5, _script_context(plan, target, manifest, bundle), bundle)
    (bundle / "model_output").mkdir()
    (bundle / toolchain["output"]).write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    return bundle, bin_dir, evil


@pytest.mark.slow
def test_build_sh_runs_the_checker_then_makertbin_passing_spec_values_as_plain_words(hostile):
    bundle, bin_dir, evil = hostile
    fake(bin_dir, "hb_mapper", 'printf "%s\\n" "$PWD" "$@" "--" >> "$CALLS"\n')
    calls = bundle / "calls"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls)}
    done = subprocess.run(["bash", bundle / "build.sh"], cwd=bundle.parent, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    checker, makertbin = calls.read_text().split("--\n")[:2]
    assert checker.splitlines() == [str(bundle), "checker", "--model-type", "onnx", "--march", f"bayes-e {evil}",
                                    "--model", "model.onnx"]
    assert makertbin.splitlines() == [str(bundle), "makertbin", "--config", f"{evil}.yaml", "--model-type", "onnx"]
    assert not list(bundle.parent.rglob("PWNED"))


@pytest.mark.slow
def test_bench_sh_runs_hrt_model_exec_at_each_thread_count_and_prints_its_results(hostile):
    bundle, bin_dir, evil = hostile
    fake(bin_dir, "hrt_model_exec", f"""printf "%s\\n" "$@" "--" >> "$CALLS"
if [ "$5" = 1 ]; then cat <<'EOF'
{ONE_THREAD}EOF
else cat <<'EOF'
{FOUR_THREADS}EOF
fi
""")
    calls = bundle / "calls"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls)}
    done = subprocess.run(["bash", bundle / "bench.sh"], cwd=bundle.parent, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    model = str(bundle / f"model_output/{evil}.bin")
    assert [c.splitlines() for c in calls.read_text().split("--\n")[:2]] == [
        ["perf", "--model_file", model, "--thread_num", n, "--frame_count", f"7 {evil}"] for n in ("1", evil)]
    table = done.stdout.splitlines()[-2:]
    assert [row.split()[-2:] for row in table] == [["8.572", "116.4"], ["16.091", "242.9"]]
    assert not list(bundle.parent.rglob("PWNED"))


@pytest.mark.slow
def test_bench_sh_without_the_compiled_model_says_how_to_make_it(deit):
    done = subprocess.run(["bash", deit.bundle / "bench.sh"], capture_output=True, text=True)
    assert done.returncode == 1
    assert "no model at" in done.stderr and "build it with build.sh on a PC" in done.stderr
