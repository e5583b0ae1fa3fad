"""device = ethos_u, format = vela: Vela's facts, its placement and estimate, the NPU rewrites, parity, budgets."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evc.driver import build
from evc.ir.program import Program
from evc.registry import load_plugins
from evc.spec.check import parse_and_check
from evc.spec.plan import ImageInput
from tests.conftest import check_fails, run_evc
from tests.targets.conftest import EFFICIENTFORMER, explained_placements

load_plugins()
from evc.targets._ethos_native import for_the_npu, mean_flattened, pool_blend, softmax_rows, window_weights  # noqa: E402, E501
from evc.targets._vela import vela_facts  # noqa: E402
from evc.targets.vela import FACTS, THRESHOLDS, estimate  # noqa: E402

NPUS = ("u55_128", "u65_256", "u85_256")
# DeiT-Tiny reduced: 64 x 64 in 16 x 16 patches, 2 blocks, its own widths (3 heads, 192 wide, 768 MLP units).
DEIT = 'timm("deit_tiny_patch16_224", img_size = 64, patch_size = 16, depth = 2, num_classes = 10)'


def spec_text(targets: str, compress: str = "", source: str = DEIT, size: int = 64) -> str:
    return (f"evc 1\nmodel small {{\n    source = {source}\n    input = image({size}, {size})\n}}\n"
            f"data calib {{ synthetic = 4 }}\n{compress}{targets}\n")


def build_spec(folder, text):
    spec = folder / "spec.evc"
    spec.write_text(text)
    return {r.target: r for r in build(parse_and_check(text, spec), folder / "out")}


# ---- Vela's facts, and a spec that names what Vela does not have -----------------------------------------

def test_ethos_u_json_is_what_the_installed_vela_says():
    facts = vela_facts()
    assert facts == FACTS, "write devices/ethos_u.json again: python -m evc.targets._vela"
    assert {"u55_32", "u55_256", "u65_512", "u85_128", "u85_2048"} <= set(facts["npus"])
    assert facts["npus"]["u85_256"]["default_system"] == "Ethos_U85_SYS_DRAM_Mid"
    assert "Dedicated_Sram" not in facts["systems"]["Ethos_U55_High_End_Embedded"]["memory_modes"]


@pytest.mark.parametrize("entry, at, message", [
    ("npu = u95_256", "u95_256", "npu: unknown value 'u95_256': expected one of u55_32, u55_64"),
    ("npu = u55_128, system = Ethos_U99", "Ethos_U99", "system: unknown value 'Ethos_U99': expected one of "
                                                       "Ethos_U55_Deep_Embedded"),
    ("npu = u55_128, memory_mode = Dedicated_Sram", "Dedicated_Sram",
     "target 'mcu': memory_mode: Vela refuses memory mode Dedicated_Sram on system Ethos_U55_High_End_Embedded"),
])
def test_an_unknown_npu_system_or_memory_mode_is_a_spec_error_at_its_place_exit_2(write_spec, entry, at, message):
    spec = write_spec(spec_text(f"target mcu {{\n    device = ethos_u, format = vela, {entry}, calibrate = calib\n}}"))
    lines = spec.read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if at in text)
    column = lines[line - 1].index(at) + 1
    assert f"small.evc:{line}:{column}: error: {message}" in check_fails(spec)


def test_a_vela_target_without_npu_or_calibrate_names_the_missing_key(write_spec):
    stderr = check_fails(write_spec(spec_text("target mcu { device = ethos_u, format = vela }")))
    assert "npu" in stderr and "calibrate" in stderr


# ---- the rewrites: the same values, and what they move onto the NPU --------------------------------------

class TalkingHeads(torch.nn.Module):
    """EfficientFormerV2's attention in small: a softmax between two 1 x 1 convs over the heads, then a global
    mean over the map: what litert-torch lays out channels-last."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 4, 4)
        self.head1, self.head2 = torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(8, 8, 1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.head2(self.head1(x).softmax(dim=-1)) + x
        return self.fc(x.mean((2, 3)))


def test_the_npu_rewrites_compute_the_same_values_and_leave_the_users_program_alone():
    torch.manual_seed(0)
    program = Program.from_module(TalkingHeads().eval(), ImageInput(32, 32))
    lowered, rewrites = for_the_npu(program, "u55_128")
    assert rewrites == {"softmax_rows": 1, "mean_flattened": 1, "patches_linear": 1, "pool_depthwise": 0}
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(lowered.run(x), program.run(x), rtol=0, atol=1e-5)  # the patches sum in another order
    assert "softmax" in program.graph.code and "softmax_rows" not in program.graph.code
    assert "patches_linear" in lowered.graph.code and "patches_linear" not in program.graph.code


def test_softmax_rows_and_mean_flattened_give_the_values_they_replace():
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(softmax_rows(x, -1), x.softmax(-1))
    assert torch.allclose(softmax_rows(x, 1), x.softmax(1), rtol=0, atol=1e-6)  # over another axis: its sums reordered
    assert torch.equal(mean_flattened(x), x.mean((2, 3)))
    assert torch.equal(mean_flattened(x, keepdim=True), x.mean((2, 3), keepdim=True))


def test_only_a_patchifying_conv_becomes_a_linear_over_its_patches():
    class Convs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = torch.nn.Conv2d(3, 8, 4, 4)  # rewritten
            self.pointwise = torch.nn.Conv2d(8, 8, 1)  # a 1 x 1 conv: kept
            self.padded = torch.nn.Conv2d(8, 8, 2, 2, padding=1)  # padded: kept
            self.overlapping = torch.nn.Conv2d(8, 8, 3, 2)  # kernel > stride: kept

        def forward(self, x):
            return self.overlapping(self.padded(self.pointwise(self.patch(x))))

    program = Program.from_module(Convs().eval(), ImageInput(32, 32))
    lowered, rewrites = for_the_npu(program, "u55_128")
    assert rewrites["patches_linear"] == 1
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(lowered.run(x), program.run(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("counts_padding", [False, True])
@pytest.mark.parametrize("height, width", [(3, 3), (5, 8), (7, 4)])
def test_pool_blend_is_a_times_x_plus_b_times_the_pool_at_every_pixel(counts_padding, height, width):
    torch.manual_seed(0)
    a, b, x = torch.randn(6), torch.randn(6), torch.randn(2, 6, height, width)
    pooled = F.avg_pool2d(x, 3, 1, 1, count_include_pad=counts_padding)
    want = a.view(1, -1, 1, 1) * x + b.view(1, -1, 1, 1) * pooled
    assert torch.allclose(pool_blend(x, *window_weights(a, b, counts_padding)), want, rtol=0, atol=1e-5)


class PoolMixers(torch.nn.Module):
    """Pooling token mixers in small: EfficientFormer's whole chain x + γ·(pool(x) − x), the last step through a
    DropPath stand-in; PoolFormer v2's, whose pool reads a norm of the stream, so its residual add stays; a pool
    counting its padding; and a 5 x 5 pool, which no rewrite takes."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 4, 4)
        self.pool = torch.nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.gamma = torch.nn.Parameter(torch.rand(8))
        self.drop_path = torch.nn.Identity()
        self.norm = torch.nn.BatchNorm2d(8)
        self.padded, self.wide = torch.nn.AvgPool2d(3, 1, 1), torch.nn.AvgPool2d(5, 1, 2, count_include_pad=False)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.drop_path((self.pool(x) - x) * self.gamma.view(1, -1, 1, 1))
        n = self.norm(x)
        x = x + self.gamma[:, None, None] * (self.pool(n) - n)
        return x + (self.padded(x) - x) + (self.wide(x) - x)


def test_a_pooling_mixer_becomes_depthwise_convs_for_the_u55_and_u65_and_stays_a_pool_for_the_u85():
    torch.manual_seed(0)
    program = Program.from_module(PoolMixers().eval(), ImageInput(32, 32))
    x = torch.randn(2, 3, 32, 32)
    for npu in ("u55_128", "u65_256"):
        lowered, rewrites = for_the_npu(program, npu)
        assert rewrites["pool_depthwise"] == 3
        assert torch.allclose(lowered.run(x), program.run(x), rtol=0, atol=1e-5)  # the windows sum in another order
        pools = [m for m in lowered.graph.modules() if isinstance(m, torch.nn.AvgPool2d)]
        assert [p.kernel_size for p in pools] == [5]  # the 5 x 5 pool alone is left
        adds = [n for n in lowered.graph.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
        assert len(adds) == 2  # PoolFormer v2's residual and the 5 x 5 pool's: the other two are in the convs
    assert for_the_npu(program, "u85_256")[1]["pool_depthwise"] == 0


@pytest.mark.slow
def test_pooling_mixers_as_depthwise_convs_are_estimated_faster_on_the_u55_and_u65(tmp_path):
    from evc.targets.tflite import convert, quantize

    class Mixers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.pool = torch.nn.Conv2d(3, 32, 3, 2, 1), torch.nn.AvgPool2d(3, 1, 1, count_include_pad=False)
            self.gamma = torch.nn.Parameter(torch.rand(32))

        def forward(self, x):
            x = self.stem(x)
            for _ in range(2):
                x = x + self.gamma.view(1, -1, 1, 1) * (self.pool(x) - x)
            return x

    torch.manual_seed(0)
    program = Program.from_module(Mixers().eval(), ImageInput(64, 64))
    calibration = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    for npu in ("u55_128", "u85_256"):
        (tmp_path / f"{npu}.tflite").write_bytes(quantize(convert(for_the_npu(program, npu)[0]), "int8", calibration))
    for npu in ("u55_128", "u65_256"):  # (the U85's choice is measured on a whole model: benchmarks/npu.py)
        pool, convs = estimate(tmp_path / "u85_256.tflite", npu), estimate(tmp_path / "u55_128.tflite", npu)
        assert pool["ops"]["cpu"] == convs["ops"]["cpu"] == 0 and "AVERAGE_POOL_2D" not in convs["by_op"]
        assert convs["inference_ms"] < 0.6 * pool["inference_ms"], (npu, pool["inference_ms"], convs["inference_ms"])


@pytest.mark.slow
def test_the_rewrites_move_softmax_and_global_mean_from_the_cpu_to_every_npu(tmp_path):
    from evc.targets.tflite import convert, quantize

    torch.manual_seed(0)
    program = Program.from_module(TalkingHeads().eval(), ImageInput(32, 32))
    calibration = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    for name, version in (("raw", program), ("lowered", for_the_npu(program, "u55_128")[0])):
        (tmp_path / f"{name}.tflite").write_bytes(quantize(convert(version), "int8", calibration))
    for npu in NPUS:
        raw, lowered = estimate(tmp_path / "raw.tflite", npu), estimate(tmp_path / "lowered.tflite", npu)
        left = {op["op"] for op in raw["cpu_ops"]}
        assert {"MEAN", "EXP"} <= left and all(op["reasons"] for op in raw["cpu_ops"])
        mean = next(op for op in raw["cpu_ops"] if op["op"] == "MEAN")
        assert "Unsupported depth-reduction" in mean["reasons"][0]
        assert lowered["ops"]["cpu"] == 0 and lowered["cpu_ops"] == []
        assert lowered["by_op"]["SOFTMAX"] == {"npu": 1, "cpu": 0}


@pytest.mark.slow
def test_a_patch_embedding_as_a_linear_over_its_patches_is_estimated_faster_on_the_u55_and_u65(tmp_path):
    from evc.targets.tflite import convert, quantize

    class Embedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch, self.head = torch.nn.Conv2d(3, 96, 16, 16), torch.nn.Linear(96, 10)

        def forward(self, x):
            return self.head(self.patch(x).flatten(2).transpose(1, 2).mean(1))

    torch.manual_seed(0)
    program = Program.from_module(Embedding().eval(), ImageInput(128, 128))
    calibration = np.random.default_rng(0).standard_normal((4, 3, 128, 128)).astype(np.float32)
    for name, version in (("raw", program), ("lowered", for_the_npu(program, "u55_128")[0])):
        (tmp_path / f"{name}.tflite").write_bytes(quantize(convert(version), "int8", calibration))
    for npu in ("u55_128", "u65_256"):
        raw, lowered = estimate(tmp_path / "raw.tflite", npu), estimate(tmp_path / "lowered.tflite", npu)
        assert "CONV_2D" in raw["by_op"] and "CONV_2D" not in lowered["by_op"] and lowered["ops"]["cpu"] == 0
        assert lowered["inference_ms"] < raw["inference_ms"] / 2, (npu, raw["inference_ms"], lowered["inference_ms"])


# ---- deit_tiny reduced, through the build --------------------------------------------------------------

@pytest.fixture(scope="module")
def deit(tmp_path_factory):
    """The reduced DeiT-Tiny, pruned as specs/deit_tiny_x5.evc prunes it, for a U55 (its softmax and LayerNorms
    in int16) and a U85."""
    targets = ("target u55 { device = ethos_u, format = vela, npu = u55_128, calibrate = calib, "
               "int16 = [softmax, layernorm] }\n"
               "target u85 { device = ethos_u, format = vela, npu = u85_256, calibrate = calib }")
    compress = "compress {\n    head_prune { keep = 2/3, score = l1 }\n    ffn_prune { keep = 70%, score = l1 }\n}\n"
    return build_spec(tmp_path_factory.mktemp("ethos"), spec_text(targets, compress))


@pytest.mark.slow
def test_every_operator_of_the_pruned_deit_runs_on_the_npu_with_vela_s_estimate_in_the_manifest(deit):
    for name, npu in (("u55", "u55_128"), ("u85", "u85_256")):
        (artifact,) = deit[name].manifest["artifacts"]
        record = artifact["ethos_u"]
        assert record["npu"] == npu and record["ops"]["cpu"] == 0 and record["ops"]["npu"] > 100
        assert record["system"] == FACTS["npus"][npu]["default_system"]
        assert record["inference_ms"] == pytest.approx(1000 * record["cycles"]["total"] / record["core_clock_hz"])
        assert record["memory"]["Sram"] > 0 and record["macs"] > 1e6
        files = set(deit[name].manifest["files"])
        assert {"model.tflite", "model_vela.tflite", "vela_per_layer.csv", "vela_summary.csv", "ethos_u.json"} <= files
        summary = json.loads((deit[name].bundle / "ethos_u.json").read_text())
        assert sum(p["npu"] for p in summary["by_op"].values()) == record["ops"]["npu"]
        assert {"BATCH_MATMUL", "SOFTMAX", "FULLY_CONNECTED"} <= set(summary["by_op"])
        assert record["rewrites"]["patches_linear"] == 1 and "CONV_2D" not in summary["by_op"]  # the patch embedding


@pytest.mark.slow
def test_the_int8_model_passes_parity_in_litert_before_vela(deit):
    for result in deit.values():
        (artifact,) = result.manifest["artifacts"]
        assert artifact["io"]["input"]["dtype"] == "int8" and artifact["io"]["output"]["dtype"] == "int8"
        assert artifact["parity_thresholds"]["cosine"] == THRESHOLDS["int8"][0]
        assert artifact["parity"]["cosine"] >= THRESHOLDS["int8"][0]
        assert artifact["parity_thresholds"]["top1_agreement"] is None  # random weights


@pytest.mark.slow
def test_int16_parts_make_the_softmax_int16_and_vela_still_runs_it_on_the_u55(deit):
    from ai_edge_litert.interpreter import Interpreter

    (artifact,) = deit["u55"].manifest["artifacts"]
    assert artifact["int16"] == ["softmax", "layernorm"] and artifact["ethos_u"]["ops"]["cpu"] == 0
    interpreter = Interpreter(model_path=str(deit["u55"].bundle / "model.tflite"))
    ops = {op["op_name"]: op for op in interpreter._get_ops_details()}
    softmax = next(op for op in interpreter._get_ops_details() if op["op_name"] == "SOFTMAX")
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    assert tensors[softmax["outputs"][0]]["dtype"] == np.int16 and "SOFTMAX" in ops
    (u85,) = deit["u85"].manifest["artifacts"]
    assert u85["int16"] == []


@pytest.mark.slow
def test_explain_shows_vela_s_placement_from_the_build_cache(deit):
    placement = explained_placements(deit["u55"].bundle)
    ops = deit["u85"].manifest["artifacts"][0]["ethos_u"]["ops"]
    assert placement["u85"]["summary"] == ops and placement["u85"]["cpu"] == []
    assert placement["u55"]["march"] == "ethos-u55-128, Ethos_U55_High_End_Embedded, Shared_Sram"


@pytest.mark.slow
def test_estimate_takes_a_tflite_and_an_npu_for_any_config(deit):
    """What benchmarks/npu.py calls: a .tflite path and an NPU, no build."""
    result = estimate(deit["u55"].bundle / "model.tflite", "u65_256")
    assert result["accelerator"] == "ethos-u65-256" and result["system"] == "Ethos_U65_Client_Server"
    assert result["ops"]["cpu"] == 0 and result["inference_ms"] > 0
    with pytest.raises(ValueError, match="unknown npu 'u99'"):
        estimate(deit["u55"].bundle / "model.tflite", "u99")


@pytest.mark.slow
def test_diff_and_the_report_show_vela_s_estimate(deit, tmp_path):
    done = run_evc("diff", deit["u55"].bundle, deit["u85"].bundle, "--json")
    assert done.returncode == 0, done.stderr
    (target,) = json.loads(done.stdout)["targets"]
    u55, u85 = (deit[n].manifest["artifacts"][0]["ethos_u"] for n in ("u55", "u85"))
    assert target["metrics"]["latency"] == {**target["metrics"]["latency"], "old": u55["inference_ms"],
                                            "new": u85["inference_ms"]}
    assert target["metrics"]["cpu_ops"]["new"] == 0
    page = (deit["u55"].bundle.parent / "report.html").read_text()
    assert "0 on the CPU" in page and "Vela (ethos-u55-128" in page
    assert f"{u55['inference_ms']:.3f} ms" in (deit["u55"].bundle / "README.md").read_text()


# ---- a hierarchical model: EfficientFormerV2, reduced ------------------------------------------------------

@pytest.mark.slow
def test_efficientformerv2_runs_wholly_on_every_npu_after_the_rewrites(tmp_path):
    source = ('timm("efficientformerv2_s1", img_size = 64, depths = [1, 1, 1, 1], embed_dims = [16, 16, 32, 32], '
              "num_classes = 10)")
    target = "target mcu { device = ethos_u, format = vela, npu = u55_128, calibrate = calib }"
    built = build_spec(tmp_path, spec_text(target, source=source))["mcu"]
    (artifact,) = built.manifest["artifacts"]
    assert artifact["ethos_u"]["rewrites"] == {"softmax_rows": 3, "mean_flattened": 1, "patches_linear": 0,
                                               "pool_depthwise": 0}
    assert artifact["parity"]["cosine"] >= THRESHOLDS["int8"][0]
    for npu in NPUS:  # the same int8 model, compiled for each
        record = estimate(built.bundle / "model.tflite", npu)
        assert record["ops"]["cpu"] == 0, record["cpu_ops"]
        assert record["by_op"]["SOFTMAX"] == {"npu": 3, "cpu": 0} and "EXP" not in record["by_op"]


@pytest.mark.slow
def test_efficientformer_l1_s_pooling_mixers_run_as_depthwise_convs_on_the_u55_and_pass_parity(tmp_path):
    target = "target mcu { device = ethos_u, format = vela, npu = u55_128, calibrate = calib }"
    built = build_spec(tmp_path, spec_text(target, source=EFFICIENTFORMER, size=224))["mcu"]
    (artifact,) = built.manifest["artifacts"]
    assert artifact["ethos_u"]["rewrites"]["pool_depthwise"] == 3  # one a stage, the last stage's block attends
    assert artifact["parity"]["cosine"] >= THRESHOLDS["int8"][0]
    record = json.loads((built.bundle / "ethos_u.json").read_text())
    assert record["ops"]["cpu"] == 0 and "AVERAGE_POOL_2D" not in record["by_op"]
    assert record["by_op"]["DEPTHWISE_CONV_2D"]["npu"] == 3 * 9


# ---- a latency budget for an NPU, from Vela's estimates ---------------------------------------------------

@pytest.mark.slow
def test_a_latency_budget_for_an_ethos_u_target_is_met_by_vela_s_estimate_of_the_built_model(tmp_path):
    # One head, so that the grid is the MLP's five widths alone: few models to lower.
    source = ('timm("vit_tiny_patch16_224", img_size = 32, patch_size = 8, depth = 2, embed_dim = 32, '
              "num_heads = 1, mlp_ratio = 8, num_classes = 10)")
    compress = ("compress {\n    budget { latency = 95%, on = mcu, data = calib, samples = 4 }\n"
                "    ffn_prune { score = l1 }\n}\n")
    target = "target mcu { device = ethos_u, format = vela, npu = u55_128, calibrate = calib }"
    built = build_spec(tmp_path, spec_text(target, compress, source, 32))["mcu"].manifest
    budget = built["budget"]
    assert budget["table"]["runtime"] == "vela estimate" and budget["table"]["units"] == [32, 64, 128, 192, 256]
    timed = budget["timed"]
    assert timed["met"] and timed["estimated_ms"] <= timed["budget_ms"]
    assert timed["estimated_ms"] == built["artifacts"][0]["ethos_u"]["inference_ms"]
    assert timed["estimated_share"] < 1 and timed["predicted_share"] <= 0.95 + 1e-9
