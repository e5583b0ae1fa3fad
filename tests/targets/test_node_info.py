"""int16 = [softmax, layernorm] on the X5: config.yaml's node_info names each LayerNorm's normalising nodes, under
the names hb_mapper reads, and the int8 proxy keeps exactly their tensors at int16."""

import re

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import TensorProto, helper

from evc.errors import BuildError
from tests.conftest import check_fails, small_spec
from tests.targets.test_bpu import CALIB, X5, build_spec, quantized_tensors

# What an opset-11 LayerNorm exports as (torch names each node after its op within the norm's scope), and the
# name node_info gives each: hb_mapper splits a Div into <name>_reciprocal and <name>_mul before it reads it.
NORMALISING = {"ReduceMean": "ReduceMean", "Sub": "Sub", "Pow": "Pow", "ReduceMean_1": "ReduceMean_1",
               "Add": "Add", "Sqrt": "Sqrt", "Div": "Div_mul"}
AFFINE = ("Mul", "Add_1")  # x * weight + bias after the Div: not named
# ONNX Runtime gives a data-movement node's output its input's quantization.
CARRIED = {"Reshape", "Transpose", "Gather", "Squeeze", "Unsqueeze", "Flatten"}


def affine_spec(tmp_path, int16="[softmax, layernorm]"):
    """The two-block ViT with a checkpoint whose LayerNorms have weights and biases other than 1 and 0, so
    their Mul and Add survive the export, and a class token int8 can resolve, so the proxy is judged."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    with torch.no_grad():
        model.cls_token.normal_(0, 1.0)
        for norm in (m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.1)
    torch.save(model.state_dict(), tmp_path / "small.pth")
    target = X5.replace("calib }", f"calib, int16 = {int16} }}")
    return small_spec(target, model_extra='    weights = "small.pth"\n', extra=CALIB)


@pytest.fixture(scope="module")
def layernorm(tmp_path_factory):
    """(bundle, manifest, model.onnx, config.yaml) of the two-block ViT built with int16 = [softmax, layernorm]."""
    folder = tmp_path_factory.mktemp("int16")
    _, result = build_spec(folder / "small.evc", affine_spec(folder))
    bundle = result.bundle
    return bundle, result.manifest, onnx.load(bundle / "model.onnx"), yaml.safe_load(
        (bundle / "config.yaml").read_text())


def norm_scopes(model):
    """The scopes of the model's LayerNorms, as torch's export names them: /norm1, /norm2, /norm1_1, ..., /norm."""
    return sorted({n.name.rsplit("/", 1)[0] for n in model.graph.node if re.match(r"/norm[^/]*/Sqrt$", n.name)})


def test_node_info_names_each_layer_norms_normalising_nodes_by_hb_mappers_names_and_every_softmax(layernorm):
    _, manifest, model, config = layernorm
    scopes = norm_scopes(model)
    assert len(scopes) == 5  # norm1 and norm2 of each block, and the final norm
    names = {n.name for n in model.graph.node}
    softmax = {n.name for n in model.graph.node if n.op_type == "Softmax"}
    expected = {f"{scope}/{named}" for scope in scopes for named in NORMALISING.values()} | softmax
    node_info = config["model_parameters"]["node_info"]
    assert set(node_info) == expected and len(node_info) == 5 * 7 + 2
    assert all(setting == {"ON": "BPU", "InputType": "int16", "OutputType": "int16"}
               for setting in node_info.values())
    # model.onnx has the Div itself, and the affine Mul and Add, which stay unnamed
    assert all(f"{scope}/Div" in names and f"{scope}/Div_mul" not in names for scope in scopes)
    assert all(f"{scope}/{op}" in names and f"{scope}/{op}" not in node_info for scope in scopes for op in AFFINE)
    assert manifest["artifacts"][0]["int16"] == {
        "softmax": {"count": 2, "ops": ["Softmax"]},
        "layernorm": {"count": 5, "ops": ["ReduceMean", "Sub", "Pow", "Add", "Sqrt", "Div"]}}


def int16_by_node_info(model, node_info):
    """The tensors of model.onnx node_info puts at int16, read from node_info's names: a `<Div>_mul` is the Div
    with only its dividend (input 0) and quotient, as the Mul hb_mapper splits it into shares only those."""
    nodes = {n.name: n for n in model.graph.node}
    wide = set()
    for name in node_info:
        if name.endswith("/Div_mul"):
            div = nodes[name.removesuffix("_mul")]
            wide |= {div.input[0], div.output[0]}
        else:
            wide |= {*nodes[name].input, *nodes[name].output}
    return wide


def test_the_proxy_quantizes_the_named_tensors_at_int16_and_the_rest_at_int8(layernorm):
    bundle, manifest, model, config = layernorm
    wide = int16_by_node_info(model, config["model_parameters"]["node_info"])
    constants = {i.name for i in model.graph.initializer}
    activations, weights = quantized_tensors(onnx.load(bundle / "model_int8_proxy.onnx"))
    at_int16 = {t for t, (dtype, _) in activations.items() if dtype == np.int16}
    assert wide - constants <= at_int16
    producers = {out: n for n in model.graph.node for out in n.output}
    carried = at_int16 - wide
    assert all(producers[t].op_type in CARRIED and producers[t].input[0] in at_int16 for t in carried), carried
    # The exponent of each Pow and the eps of each Add: constants, stored at int16
    assert {weights[t + "_quantized"][0] for t in wide & constants} == {np.dtype(np.int16)}
    for scope in norm_scopes(model):
        assert activations[f"{scope}/Sqrt_output_0"][0] == np.int16  # the Div's divisor, by the Sqrt's OutputType
        assert activations[f"{scope}/Mul_output_0"][0] == np.int8  # the affine weight's product: not named
    assert {dtype for t, (dtype, _) in activations.items() if t not in at_int16} == {np.dtype(np.int8)}
    assert manifest["artifacts"][1]["int16_tensors"] == len(wide)


def test_the_bundle_readme_says_what_node_info_names_and_what_the_proxy_does_for_the_div(layernorm):
    readme = (layernorm[0] / "README.md").read_text()
    assert "- layernorm, 5 in the model: ReduceMean, Sub, Pow, Add, Sqrt, Div" in readme
    assert "`node_info` names each LayerNorm's Div as\n`<name>_mul`" in readme
    assert "divides in float by the divisor" in readme


@pytest.mark.slow
def test_by_default_node_info_names_no_layer_norm_node(tmp_path):
    _, result = build_spec(tmp_path / "small.evc", affine_spec(tmp_path, int16="[softmax]"))
    model = onnx.load(result.bundle / "model.onnx")
    node_info = yaml.safe_load((result.bundle / "config.yaml").read_text())["model_parameters"]["node_info"]
    assert list(node_info) == [n.name for n in model.graph.node if n.op_type == "Softmax"]
    assert result.manifest["artifacts"][0]["int16"] == {"softmax": {"count": 2, "ops": ["Softmax"]}}
    assert "layernorm" not in (result.bundle / "README.md").read_text()


@pytest.mark.parametrize("value, at, message", [
    ("[softmax, gelu]", "gelu", "int16: unknown value 'gelu': expected one of softmax, layernorm"),
    ("[layernorm]", "[layernorm]", "target 'x5': int16: softmax cannot be left out: rdk_x5's BPU runs Softmax "
                                   "only when node_info names it, in int16"),
    ("8", "8 }", "int16: expected one of softmax, layernorm, found an integer"),
])
def test_a_bad_int16_is_a_spec_error_at_its_place_exit_2(write_spec, value, at, message):
    spec = write_spec(small_spec(X5.replace("calib }", f"calib, int16 = {value} }}"), extra=CALIB))
    lines = spec.read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if "int16" in text)
    column = lines[line - 1].index(at) + 1
    assert f"small.evc:{line}:{column}: error: {message}" in check_fails(spec)


# ---- the proxy reads node_info's names back ----------------------------------------------------------

def test_a_div_named_as_hb_mapper_splits_it_widens_its_dividend_and_quotient_not_its_divisor():
    from evc.registry import DEVICES, load_plugins

    load_plugins()
    from evc.targets._node_info import int16_inputs_outputs

    div = helper.make_node("Div", ["d", "s"], ["q"], "/norm/Div")
    model = helper.make_model(helper.make_graph([div], "g", [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("d", "s")],
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 4])]))
    renamed = DEVICES["rdk_x5"].facts["node_info"]["renamed"]
    setting = {"ON": "BPU", "InputType": "int16", "OutputType": "int16"}
    assert int16_inputs_outputs(model, {"/norm/Div_mul": setting}, renamed) == {"d", "q"}
    assert int16_inputs_outputs(model, {"/norm/Div": setting}, renamed) == {"d", "s", "q"}
    with pytest.raises(BuildError, match="node_info names '/norm/Div_reciprocal', which is no node of model.onnx"):
        int16_inputs_outputs(model, {"/norm/Div_reciprocal": setting}, renamed)
