"""format = bpu: the files Horizon's toolchain reads, the operator check, the int8 proxy and its gate."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from onnx import TensorProto, helper, numpy_helper

from evc.driver import build
from evc.errors import BuildError, SpecError
from evc.model.data import load_images
from evc.registry import DEVICES, FORMATS, load_plugins
from evc.spec.check import parse_and_check
from evc.spec.plan import ImageInput
from tests.conftest import SMALL_MODEL, run_evc, small_spec
from tests.emulated import logits_on, needs_qemu

load_plugins()
FACTS = DEVICES["rdk_x5"].facts
from evc.targets._bpu_ops import check_ops  # noqa: E402
from evc.targets.bpu import for_the_bpu  # noqa: E402  (registered by load_plugins)

CALIB = "data calib { synthetic = 8 }\n"
X5 = "target x5 { device = rdk_x5, format = bpu, calibrate = calib }"
# Per-channel values, stated in the spec, so a channel mix-up shows (vit_tiny's own are 0.5 in every channel).
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SMALL_INPUT = f"image(32, 32, mean = {list(MEAN)}, std = {list(STD)})"


def build_spec(path, text):
    path.write_text(text)
    plan = parse_and_check(text, path)
    (result,) = build(plan, path.parent / "out")
    return plan, result


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The two-block ViT lowered to bpu once: (plan, bundle, manifest)."""
    spec = small_spec(X5, extra=CALIB).replace("image(32, 32)", SMALL_INPUT)
    plan, result = build_spec(tmp_path_factory.mktemp("bpu") / "small.evc", spec)
    return plan, result.bundle, result.manifest


def weighted_spec(tmp_path, class_token_std=None, extra=""):
    """The small ViT with a checkpoint of its random init, so the int8 gate applies."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    if class_token_std is not None:
        with torch.no_grad():
            model.cls_token.normal_(0, class_token_std)
    torch.save(model.state_dict(), tmp_path / "small.pth")
    return small_spec(X5.replace("calib }", f"calib{extra} }}"), model_extra='    weights = "small.pth"\n',
                      extra=CALIB)


# ---- the bundle ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_bundle_holds_model_config_calibration_check_proxy_and_scripts(small):
    _, bundle, manifest = small
    assert sorted(p.name for p in bundle.iterdir()) == [
        "README.md", "bench.sh", "build.sh", "calibration", "config.yaml", "manifest.json", "model.onnx",
        "model_int8_proxy.onnx", "op_check.json", "parse_hrt.py"]
    assert [a["path"] for a in manifest["artifacts"]] == ["model.onnx", "model_int8_proxy.onnx"]
    assert manifest["artifacts"][0]["toolchain"]["output"] == "model_output/small.bin"


def test_model_onnx_is_opset_11_with_a_fixed_batch_1_input_and_unique_node_names(small):
    _, bundle, manifest = small
    model = onnx.load(bundle / "model.onnx")
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [11]
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 32, 32]
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert manifest["artifacts"][0]["parity"]["max_abs_diff"] < 1e-4


def test_node_info_puts_every_softmax_of_the_written_model_on_the_bpu_in_int16(small):
    _, bundle, manifest = small
    config = yaml.safe_load((bundle / "config.yaml").read_text())
    softmax = [n.name for n in onnx.load(bundle / "model.onnx").graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 2  # one per block
    assert config["model_parameters"]["node_info"] == {
        name: {"ON": "BPU", "InputType": "int16", "OutputType": "int16"} for name in softmax}
    assert manifest["artifacts"][0]["node_info"] == softmax


def test_config_yaml_names_model_march_and_the_toolchains_settings(small):
    _, bundle, _ = small
    config = yaml.safe_load((bundle / "config.yaml").read_text())
    model = config["model_parameters"]
    assert (model["onnx_model"], model["march"], model["working_dir"], model["output_model_file_prefix"]) == (
        "model.onnx", "bayes-e", "model_output", "small")
    assert (bundle / model["onnx_model"]).is_file()
    inputs = config["input_parameters"]
    assert {k: inputs[k] for k in ("input_type_rt", "input_type_train", "input_layout_train", "norm_type")} == {
        "input_type_rt": "nv12", "input_type_train": "rgb", "input_layout_train": "NCHW",
        "norm_type": "data_mean_and_scale"}
    assert config["calibration_parameters"] == {"cal_data_dir": "./calibration", "cal_data_type": "float32",
                                                "calibration_type": "max"}
    assert config["compiler_parameters"] == {"compile_mode": "latency", "optimize_level": "O3"}


def test_mean_and_scale_are_the_models_normalisation_in_0_to_255_pixel_units(small):
    _, bundle, _ = small
    inputs = yaml.safe_load((bundle / "config.yaml").read_text())["input_parameters"]
    mean = [float(v) for v in inputs["mean_value"].split()]
    scale = [float(v) for v in inputs["scale_value"].split()]
    assert mean == pytest.approx([m * 255 for m in MEAN], rel=1e-9)
    assert scale == pytest.approx([1 / (s * 255) for s in STD], rel=1e-9)
    pixels = np.random.default_rng(0).random((3, 4)) * 255  # the toolchain's (x - mean) * scale on pixels
    ours = (pixels - np.array(mean)[:, None]) * np.array(scale)[:, None]
    assert ours == pytest.approx((pixels / 255 - np.array(MEAN)[:, None]) / np.array(STD)[:, None], rel=1e-6)


def test_calibration_files_are_the_calib_images_as_nchw_float32_pixels_before_normalisation(small):
    plan, bundle, manifest = small
    files = sorted((bundle / "calibration").iterdir())
    assert len(files) == 8 == manifest["artifacts"][0]["toolchain"]["calibration_samples"]
    raw = np.stack([np.fromfile(f, dtype=np.float32).reshape(1, 3, 32, 32) for f in files])[:, 0]
    assert 0 <= raw.min() and raw.max() <= 255 and raw.max() > 200
    normalised = load_images(plan.data["calib"], ImageInput(32, 32, MEAN, STD))
    mean, std = np.array(MEAN).reshape(1, 3, 1, 1), np.array(STD).reshape(1, 3, 1, 1)
    assert (raw / 255 - mean) / std == pytest.approx(normalised, abs=1e-4)


# ---- the int8 proxy and its gate ----------------------------------------------------------------

def test_the_int8_proxy_is_quantized_and_compared_with_pytorch_in_the_manifest(small):
    _, bundle, manifest = small
    proxy = manifest["artifacts"][1]
    assert proxy["quantize"] == "int8" and set(proxy["parity"]) == {
        "max_abs_diff", "cosine", "mean_cosine", "top1_agreement", "samples"}
    ops = {(n.op_type, n.domain) for n in onnx.load(bundle / "model_int8_proxy.onnx").graph.node}
    assert ("QuantizeLinear", "com.microsoft") in ops  # int8 QDQ, with int16 around each Softmax
    # A random model's int8 cosine says nothing of the trained model's: reported, not gated.
    assert proxy["gate"]["applied"] is False and "randomly initialised" in proxy["gate"]["why_not"]


def test_the_int8_proxy_runs_its_quantize_dequantize_pairs_in_float_so_any_x86_host_agrees(small):
    """Fused into ONNX Runtime's int8 kernels, the proxy's numbers depend on the CPU: without VNNI, 8-bit
    products are summed in 16 bits and can saturate (efficientvit_m5 fell to cosine 0.989 there, 0.9996
    unfused). Unfused, every QuantizeLinear and DequantizeLinear runs as written in float, with exact sums
    as the BPU's 32-bit accumulators: the same on any host, so it must equal ONNX Runtime with every graph
    optimisation off. Fused kernels differ from that with VNNI too: by 0.011 in outputs of 0.6 here, on a
    host with AVX-512 VNNI."""
    _, bundle, manifest = small
    proxy = bundle / "model_int8_proxy.onnx"
    images = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(proxy), options, providers=["CPUExecutionProvider"])
    as_written = np.concatenate([plain.run(None, {"input": x[None]})[0] for x in images])
    assert np.array_equal(FORMATS["bpu"].plugin.run(proxy, images), as_written)


@pytest.mark.slow
@needs_qemu
def test_the_int8_proxy_gives_this_hosts_numbers_on_avx2_without_vnni(small, tmp_path):
    """What the test above argues, run: the proxy on an emulated Haswell (AVX2, no AVX-512, no VNNI;
    tests/emulated.py) gives this host's logits, so its parity figure and gate do not depend on the CPU."""
    _, bundle, _ = small
    images = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    models = [bundle / "model.onnx", bundle / "model_int8_proxy.onnx"]
    here, haswell = (logits_on(cpu, "bpu", models, images, tmp_path) for cpu in (None, "Haswell"))
    # Measured here: within 2.1e-7 of logits up to 0.95. The bound allows what another host's float
    # kernels may do to an activation next to a quantization step: 1% of the logits' range.
    assert np.abs(here - haswell).max() <= 0.01 * np.abs(here).max()


def quantized_tensors(proxy):
    """{tensor of model.onnx: (zero point's dtype, scale's size)} for every QuantizeLinear of the proxy, and the
    same for every weight the proxy stores quantized (an initializer feeding a DequantizeLinear)."""
    inits = {i.name: numpy_helper.to_array(i) for i in proxy.graph.initializer}
    activations, weights = {}, {}
    for node in proxy.graph.node:
        if node.op_type == "QuantizeLinear":
            activations[node.input[0]] = (inits[node.input[2]].dtype, inits[node.input[1]].size)
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
            weights[node.input[0]] = (inits[node.input[2]].dtype, inits[node.input[1]].size)
    return activations, weights


def test_the_proxy_quantizes_as_config_yaml_says_int16_exactly_where_node_info_says(small):
    _, bundle, manifest = small
    config = yaml.safe_load((bundle / "config.yaml").read_text())
    model = onnx.load(bundle / "model.onnx")
    named = config["model_parameters"]["node_info"]
    wide = {t for n in model.graph.node if n.name in named for t in (*n.input, *n.output)}
    activations, _ = quantized_tensors(onnx.load(bundle / "model_int8_proxy.onnx"))
    assert {t for t, (dtype, _) in activations.items() if dtype == np.int16} == wide
    assert {dtype for t, (dtype, _) in activations.items() if t not in wide} == {np.dtype(np.int8)}
    assert all(size == 1 for _, size in activations.values())  # activations per tensor
    # Every node the op check puts on the BPU has its float inputs quantized, LayerNorm's and GELU's too.
    report = json.loads((bundle / "op_check.json").read_text())
    on_bpu = {n["node"] for n in report["nodes"] if n["on"] == "bpu"}
    for op in ("ReduceMean", "Pow", "Sqrt", "Div", "Erf", "Softmax", "MatMul"):
        node = next(n for n in model.graph.node if n.op_type == op and n.name in on_bpu)
        assert node.input[0] in activations, op
    assert manifest["artifacts"][1]["calibration"] == {"type": "max", "method": "MinMax"}


def test_the_proxy_weights_are_int8_per_output_channel(small):
    _, bundle, _ = small
    _, weights = quantized_tensors(onnx.load(bundle / "model_int8_proxy.onnx"))
    model = onnx.load(bundle / "model.onnx")
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    gemms = [n for n in model.graph.node if n.op_type in ("Gemm", "Conv")]
    assert gemms and all(n.input[1] + "_quantized" in weights or n.input[1] in weights for n in gemms)
    for node in gemms:
        dtype, size = weights.get(node.input[1] + "_quantized", weights.get(node.input[1]))
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        channels = shapes[node.input[1]][0 if node.op_type == "Conv" or trans_b else 1]
        assert dtype == np.int8 and size == channels, node.name


def test_calibration_type_max_sets_the_input_scale_from_the_largest_calibration_magnitude(small):
    _, bundle, _ = small
    proxy = onnx.load(bundle / "model_int8_proxy.onnx")
    inits = {i.name: numpy_helper.to_array(i) for i in proxy.graph.initializer}
    (quantize,) = [n for n in proxy.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input"]
    raw = np.stack([np.fromfile(f, dtype=np.float32) for f in sorted((bundle / "calibration").iterdir())])
    mean = np.repeat(np.array(MEAN), 32 * 32)
    std = np.repeat(np.array(STD), 32 * 32)
    largest = np.abs((raw / 255 - mean) / std).max()
    assert float(inits[quantize.input[1]]) == pytest.approx(largest / 127, rel=1e-4)  # symmetric: ±127


def test_a_calibration_type_the_proxy_cannot_follow_stops_the_build_naming_it():
    from evc.targets._bpu_proxy import proxy_plan

    config = {"calibration_parameters": {"calibration_type": "mix"}, "model_parameters": {}}
    with pytest.raises(BuildError, match="calibration_type 'mix' has no int8 proxy here"):
        proxy_plan(onnx.ModelProto(), config, set())


@pytest.mark.slow
def test_at_random_weights_the_build_summary_says_the_proxy_is_not_judged_and_why(write_spec, tmp_path):
    done = run_evc("build", write_spec(small_spec(X5, extra=CALIB)), "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    (line,) = [row for row in done.stdout.splitlines() if "model_int8_proxy.onnx" in row]
    assert "parity not judged: the weights are random" in line and "below int8 resolution" in line
    assert "cosine" not in line and "top-1" not in line  # no figure that reads as a failure
    (onnx_line,) = [row for row in done.stdout.splitlines() if "model.onnx" in row]
    assert "cosine 1.00000" in onnx_line  # the float model's parity is still printed


@pytest.mark.slow
def test_an_int8_collapse_of_a_model_with_weights_fails_the_build_with_exit_1(write_spec, tmp_path):
    # A checkpoint of the random init: its class token (~1e-6) is below int8 resolution.
    spec = write_spec(weighted_spec(tmp_path))
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "the int8 proxy collapsed: mean cosine to PyTorch" in done.stderr
    assert "below min_cosine 0.9 (the worst image's: " in done.stderr
    assert "LayerNorm's pieces are int8 here, and int16 = [softmax, layernorm] puts them in int16" in done.stderr
    failed = json.loads((tmp_path / "out" / "small" / "x5.failed" / "manifest.json").read_text())
    assert failed["artifacts"][1]["parity"]["mean_cosine"] < 0.9


@pytest.mark.slow
def test_a_model_with_weights_whose_int8_proxy_holds_passes_the_gate(tmp_path):
    _, result = build_spec(tmp_path / "small.evc", weighted_spec(tmp_path, class_token_std=1.0))
    proxy = result.manifest["artifacts"][1]
    assert proxy["gate"] == {"min_cosine": 0.9, "applied": True}
    assert proxy["parity"]["cosine"] > 0.99 and proxy["parity"]["mean_cosine"] > 0.99


@pytest.mark.parametrize("key, message", [
    ("quantize = int16", "quantize: unknown value 'int16': expected one of int8"),
    ("calibrate = nowhere", "undefined data 'nowhere'"),
])
def test_bpu_keys_are_checked(key, message):
    text = small_spec(X5.replace("calibrate = calib", key), extra=CALIB)
    with pytest.raises(SpecError) as caught:
        parse_and_check(text, "t.evc")
    assert message in [d.message for d in caught.value.diagnostics]


def test_calibrate_is_required():
    with pytest.raises(SpecError) as caught:
        parse_and_check(small_spec(X5.replace(", calibrate = calib", ""), extra=CALIB), "t.evc")
    assert caught.value.diagnostics[0].message == "target 'x5' is missing required key 'calibrate'"


@pytest.mark.slow
def test_an_odd_input_size_cannot_be_an_nv12_camera_input(write_spec, tmp_path):
    tiny = 'timm("vit_tiny_patch16_224", img_size = 7, patch_size = 7, depth = 1, num_classes = 10)'
    spec = write_spec(small_spec(X5, extra=CALIB).replace(SMALL_MODEL, tiny).replace("image(32, 32)", "image(7, 7)"))
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "nv12 camera input of rdk_x5 needs an even height and width, not 7x7" in done.stderr


# ---- the operator check -------------------------------------------------------------------------

def test_every_node_of_the_model_is_placed_and_the_manifest_counts_them(small):
    _, bundle, manifest = small
    report = json.loads((bundle / "op_check.json").read_text())
    model = onnx.load(bundle / "model.onnx")
    assert [n["node"] for n in report["nodes"]] == [n.name for n in model.graph.node]
    summary = manifest["artifacts"][0]["op_check"]["summary"]
    assert summary == report["summary"] and sum(summary.values()) == len(model.graph.node)
    softmax = [n for n in report["nodes"] if n["op"] == "Softmax"]
    assert {n["on"] for n in softmax} == {"bpu"} and all("node_info" in n["via"] for n in softmax)
    # timm's q/k/v split along axis 0 of a 5-D tensor is lowered as three projections: nothing on the CPU.
    assert manifest["artifacts"][0]["op_check"]["cpu"] == [] and summary["cpu"] == 0


def test_placement_gives_explain_the_check_the_manifest_keeps(small, tmp_path):
    from evc.cache import Cache
    from evc.driver import compile_model
    from evc.progress import Progress

    plan, _, manifest = small
    program = compile_model(plan, Cache(tmp_path), Progress(), write_cache=False).program
    assert FORMATS["bpu"].plugin.placement(program, plan.targets[0]) == manifest["artifacts"][0]["op_check"]


def graph(nodes, inputs, outputs, initializers=()):
    """An opset-11 model of `nodes`; inputs and outputs are (name, shape) pairs, float32."""
    def values(pairs):
        return [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in pairs]

    g = helper.make_graph(nodes, "g", values(inputs), values(outputs),
                          [numpy_helper.from_array(np.asarray(v), n) for n, v in initializers])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)], ir_version=6)


def placed(model, node_info=()):
    return {n["node"]: n for n in check_ops(model, FACTS, set(node_info))["nodes"]}


def test_softmax_runs_on_the_bpu_only_when_node_info_names_it():
    model = graph([helper.make_node("Softmax", ["x"], ["y"], "sm", axis=3)], [("x", [1, 2, 8, 8])],
                  [("y", [1, 2, 8, 8])])
    assert placed(model)["sm"] == {"node": "sm", "op": "Softmax", "on": "cpu",
                                   "why": "Softmax runs on the CPU unless node_info names it"}
    assert placed(model, {"sm"})["sm"]["on"] == "bpu"


def test_ops_the_table_keeps_on_the_cpu_or_lacks_are_reported_so():
    model = graph([helper.make_node("Neg", ["x"], ["a"], "neg"),
                   helper.make_node("Einsum", ["a"], ["b"], "einsum", equation="ij->ji"),
                   helper.make_node("NonZero", ["b"], ["y"], "nonzero")],
                  [("x", [4, 4])], [("y", None)])
    found = placed(model)
    assert (found["neg"]["on"], found["neg"]["why"]) == ("cpu", "Neg runs only on the CPU")
    assert (found["einsum"]["on"], found["einsum"]["why"]) == (
        "unsupported", "the bayes-e toolchain does not support Einsum")
    assert (found["nonzero"]["on"], found["nonzero"]["why"]) == (
        "unsupported", "NonZero is not in the bayes-e operator table")


@pytest.mark.parametrize("axes, keepdims, shape, why", [
    ([3], 1, [1, 8, 4, 4], None),
    ([2, 3], 1, [1, 8, 4, 4], None),  # H and W together
    ([1, 2], 1, [1, 8, 4, 4], "reduces axes [1, 2]; the BPU reduces one axis or H and W"),
    ([3], 0, [1, 8, 4, 4], "keepdims = 0; the BPU takes keepdims = 1"),
    ([0], 1, [8], "input is 1-D; the BPU takes 2- to 5-D"),
])
def test_reduce_mean_limits(axes, keepdims, shape, why):
    node = helper.make_node("ReduceMean", ["x"], ["y"], "mean", axes=axes, keepdims=keepdims)
    found = placed(graph([node], [("x", shape)], [("y", None)]))["mean"]
    assert found.get("why") == why and found["on"] == ("cpu" if why else "bpu")


def test_matmul_may_broadcast_its_second_input_but_not_its_first():
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"], "ok"),
             helper.make_node("MatMul", ["c", "d"], ["z"], "bad")]
    model = graph(nodes, [("a", [2, 3, 8, 4]), ("b", [2, 1, 4, 8]), ("c", [2, 1, 8, 4]), ("d", [1, 3, 4, 8])],
                  [("y", None), ("z", None)])
    found = placed(model)
    assert found["ok"]["on"] == "bpu"
    assert found["bad"]["why"] == ("[2, 1, 8, 4] x [1, 3, 4, 8] broadcasts the first input; "
                                   "the BPU broadcasts only the second")


def test_computed_int64_gather_indices_fall_back_and_constant_ones_do_not():
    nodes = [helper.make_node("Gather", ["x", "k"], ["y"], "constant"),
             helper.make_node("ArgMax", ["x"], ["i"], "argmax", axis=1, keepdims=0),
             helper.make_node("Gather", ["x", "i"], ["z"], "computed")]
    model = graph(nodes, [("x", [4, 4])], [("y", None), ("z", None)], [("k", np.array([0], dtype=np.int64))])
    found = placed(model)
    assert found["constant"]["on"] == "bpu"
    assert found["computed"]["why"] == "computed int64 indices; the BPU wants int32"


def test_a_limit_the_shapes_cannot_settle_is_reported_unchecked_not_claimed():
    nodes = [helper.make_node("Shape", ["x"], ["s"], "shape"),
             helper.make_node("Cast", ["s"], ["f"], "cast", to=TensorProto.FLOAT),
             helper.make_node("Resize", ["x", "roi", "f"], ["y"], "resize")]
    model = graph(nodes, [("x", [1, 3, 8, 8])], [("y", None)], [("roi", np.zeros(0, dtype=np.float32))])
    found = placed(model)["resize"]
    assert found["on"] == "bpu"
    assert found["unchecked"] == ["scales and sizes are computed; the BPU resizes only H and W"]


# ---- rewrites for the BPU -----------------------------------------------------------------------

def outputs(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def test_a_3d_softmax_gets_a_4d_input_its_name_and_the_same_values():
    model = graph([helper.make_node("Softmax", ["x"], ["y"], "attn/Softmax", axis=2)], [("x", [4, 6, 6])],
                  [("y", [4, 6, 6])])
    feed = {"x": np.random.default_rng(0).standard_normal((4, 6, 6), dtype=np.float32)}
    before = outputs(model, feed)
    for_the_bpu(model, FACTS)
    assert [(n.op_type, n.name) for n in model.graph.node] == [
        ("Unsqueeze", "attn/Softmax/unsqueeze"), ("Softmax", "attn/Softmax"), ("Squeeze", "attn/Softmax/squeeze")]
    assert outputs(model, feed)[0] == pytest.approx(before[0], abs=1e-7)
    assert placed(model, {"attn/Softmax"})["attn/Softmax"]["on"] == "bpu"


def test_an_uneven_split_becomes_slices_with_the_same_values():
    model = graph([helper.make_node("Split", ["x"], ["q", "k", "v"], "qkv", axis=1, split=[2, 2, 4])],
                  [("x", [1, 8, 3, 3])], [("q", None), ("k", None), ("v", None)])
    feed = {"x": np.random.default_rng(0).standard_normal((1, 8, 3, 3), dtype=np.float32)}
    assert placed(model)["qkv"]["why"] == "uneven split [2, 2, 4]"
    before = outputs(model, feed)
    for_the_bpu(model, FACTS)
    assert [(n.op_type, n.name) for n in model.graph.node] == [("Slice", f"qkv/slice_{i}") for i in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(outputs(model, feed), before))
    assert {n["on"] for n in placed(model).values()} == {"bpu"}


def test_an_unsupported_node_stops_the_lowering_naming_it(small):
    from evc.targets._bpu_ops import require_supported

    model = graph([helper.make_node("Einsum", ["x"], ["y"], "mix", equation="ij->ji")], [("x", [4, 4])],
                  [("y", None)])
    with pytest.raises(BuildError, match=r"1 node\(s\) the bayes-e BPU toolchain cannot take: mix \(Einsum\)"):
        require_supported(check_ops(model, FACTS, set()), FACTS)
