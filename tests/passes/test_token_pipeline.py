"""The token passes inside a build: ONNX and TFLite with parity, the BPU op check, search, explain, errors."""

import onnx
import pytest

from evc.driver import build
from evc.spec.check import parse_and_check
from tests.conftest import check_fails, run_evc, small_spec

CALIB = "data calib { synthetic = 8 }\n"
TARGETS = """target cpu { device = cpu, format = onnx }
target phone { device = android, format = tflite }
target x5 { device = rdk_x5, format = bpu, quantize = int8, calibrate = calib }"""
# Dynamic-shape ops a token method would need without evc's static formulation
DYNAMIC = {"ScatterElements", "ScatterND", "NonZero", "Unique", "Loop", "If"}


def built(write_spec, tmp_path, compress, targets=TARGETS):
    spec = write_spec(small_spec(targets=targets, extra=CALIB + compress))
    return {r.target: r for r in build(parse_and_check(spec.read_text(), spec), tmp_path / "out")}


@pytest.mark.slow
def test_token_merge_with_head_prune_builds_onnx_tflite_and_x5_with_parity(write_spec, tmp_path):
    results = built(write_spec, tmp_path, "compress {\n    token_merge { r = 4 }\n    head_prune { keep = 2/3 }\n}\n")
    for name in ("cpu", "phone"):
        parity = results[name].manifest["artifacts"][0]["parity"]
        assert parity["max_abs_diff"] < 1e-4, name
    assert [b["tokens"] for b in results["cpu"].manifest["structure"]["blocks"]] == [17, 13]
    ops = {n.op_type for n in onnx.load(str(results["cpu"].bundle / "model.onnx")).graph.node}
    assert {"TopK", "MatMul"} <= ops and not ops & DYNAMIC
    check = results["x5"].manifest["artifacts"][0]["op_check"]
    placed = {n["op"] for n in check["cpu"] + check["unsupported"]}
    assert check["summary"]["bpu"] > 0 and "TopK" not in placed  # the table says the BPU runs TopK
    assert results["x5"].manifest["artifacts"][0]["ops"]["TopK"] >= 1


@pytest.mark.slow
def test_searched_patch_slim_builds_and_reports_its_schedule_in_manifest_and_explain(write_spec, tmp_path):
    compress = ("compress {\n    patch_slim { fuse = true, search = { tolerance = 0.5, step = 4, data = calib } }\n"
                "    ffn_prune { keep = 0.5 }\n}\n")
    results = built(write_spec, tmp_path, compress, TARGETS.rsplit("\n", 1)[0])
    manifest = results["phone"].manifest
    keep = manifest["passes"][0]["found"]["keep"]
    assert len(keep) == 2 and keep[0] == 1 and keep[1] < 1
    blocks = manifest["params_macs"]["after"]["blocks"]
    assert blocks[1]["tokens"] < blocks[0]["tokens"]
    assert manifest["params_macs"]["after"]["total"]["macs"] < manifest["params_macs"]["before"]["total"]["macs"]
    for name in ("cpu", "phone"):
        assert results[name].manifest["artifacts"][0]["parity"]["max_abs_diff"] < 1e-4, name
    spec = tmp_path / "small.evc"
    done = run_evc("explain", spec, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert f"found: keep = [1, {keep[1]:g}]" in done.stdout


def test_the_two_token_passes_in_one_spec_is_a_spec_error(write_spec):
    stderr = check_fails(write_spec(small_spec(extra="compress {\n    patch_slim { keep = 0.5 }\n"
                                                     "    token_merge { r = 2 }\n}\n")))
    assert "small.evc:8:5" in stderr and "patch_slim" in stderr


def test_a_keep_list_that_drops_patches_before_block_0_points_at_the_list(write_spec):
    stderr = check_fails(write_spec(small_spec(extra="compress {\n    patch_slim { keep = [0.5, 0.5] }\n}\n")))
    assert "small.evc:7:25" in stderr and "block 0" in stderr


@pytest.mark.slow
def test_cls_attention_on_a_model_without_a_class_token_exits_2_naming_the_key(write_spec, tmp_path):
    gap = 'num_classes = 10, class_token = false, global_pool = "avg")'
    spec = write_spec(small_spec(extra="compress {\n    patch_slim { keep = 0.5, score = cls_attention }\n}\n")
                      .replace("num_classes = 10)", gap))
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 2
    assert "small.evc:7:38" in done.stderr and "mean_attention" in done.stderr
    assert "Traceback" not in done.stderr
