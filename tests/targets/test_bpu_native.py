"""The BPU-native lowering: every node of the ViTs evc compresses on the X5's BPU, values unchanged.

Reduced-size models with the operator structure of the full ones (2-3 blocks, 32 or 64 px): the rewrites
match operator patterns, not sizes. And the full-size models issue 15 names, at random weights, exported
and lowered only (no bundle): deit_small, and each compressed variant of specs/ with token_merge (r = 8)
on deit_small. tests/targets/test_rdk_x5.py builds full-size deit_tiny and efficientvit_m5 whole.
"""

import numpy as np
import onnx
import pytest

from evc.registry import load_plugins
from tests.passes.test_staged import program_of as staged_program
from tests.targets.bpu_models import FACTS, FULL_SIZE, lowered, max_abs_diff, merged, pruned, slimmed, vit

load_plugins()
from evc.targets._bpu_native import bpu_native  # noqa: E402  (registered by load_plugins)
from evc.targets._bpu_ops import check_ops  # noqa: E402
from evc.targets.bpu import bpu_onnx  # noqa: E402


def deit(name, size=32, depth=2):
    return vit(name, size, patch_size=8, depth=depth)


MODELS = {
    "deit_tiny": lambda: deit("deit_tiny_patch16_224"),
    "deit_small": lambda: deit("deit_small_patch16_224"),
    "deit_small_pruned": lambda: pruned(deit("deit_small_patch16_224")),  # specs/deit_small_android.evc's passes
    "deit_small_patch_slim": lambda: slimmed(deit("deit_small_patch16_224", 64, 3), [1, 0.7, 0.7]),
    "deit_small_token_merge": lambda: merged(deit("deit_small_patch16_224", 64, 3), 2),
    **{name: (lambda name=name: pruned(staged_program(name)))
       for name in ("swin", "pvt_v2", "levit", "efficientvit", "efficientformerv2", "fastvit_sa")},
    # Full size; deit_tiny and efficientvit_m5 are built whole in test_rdk_x5.py.
    **{f"full_{name}": case.make for name, case in FULL_SIZE.items()
       if name not in ("deit_tiny", "efficientvit_m5_pruned")},
}
# On the raw export (before the rewrite), what the table sent to the CPU: the rewrite is what moves them.
RAW_CPU = {"deit_tiny": 2, "deit_small": 2, "deit_small_pruned": 2, "deit_small_patch_slim": 17,
           "deit_small_token_merge": 77, "swin": 25, "pvt_v2": 7, "levit": 55, "efficientvit": 1,
           "efficientformerv2": 1, "fastvit_sa": 4,
           # 12 blocks: one q/k/v Split each, and the token passes' gathers and merges (320 at r = 8)
           "full_deit_tiny_pruned": 12, "full_deit_small": 12, "full_deit_small_pruned": 12,
           "full_deit_small_patch_slim": 75, "full_deit_small_token_merge": 320}
# Swin's windows are 6-D views and its shift mask a 5-D Add, EfficientViT's windows 5-D or 6-D views:
# Reshape, Transpose and elementwise ops the BPU takes at up to 10 dims. No 5-D tensor elsewhere.
ABOVE_4D = {"swin": {"Reshape", "Transpose", "Add"}, "efficientvit": {"Reshape", "Transpose"}}


@pytest.fixture(scope="module", params=list(MODELS))
def lowered_model(request, tmp_path_factory):
    """(name, program, path of the lowered ONNX, the lowered model, its op check, the raw export's op check)"""
    program = MODELS[request.param]()
    path = tmp_path_factory.mktemp("native") / "model.onnx"
    model, report, raw_report = lowered(program, path)
    softmax = [n["node"] for n in raw_report["nodes"] if n["op"] == "Softmax"]
    assert [n.name for n in model.graph.node if n.op_type == "Softmax"] == softmax  # node_info names them still
    yield request.param, program, path, model, report, raw_report
    path.unlink()


@pytest.mark.slow
def test_every_node_runs_on_the_bpu(lowered_model):
    name, _, _, _, report, _ = lowered_model
    assert report["summary"]["cpu"] == report["summary"]["unsupported"] == 0, [
        (n["node"], n["why"]) for n in report["nodes"] if n["on"] != "bpu"]


@pytest.mark.slow
def test_the_rewritten_onnx_matches_pytorch_within_1e_4(lowered_model):
    _, program, path, _, _, _ = lowered_model
    assert max_abs_diff(program, path) <= 1e-4


@pytest.mark.slow
def test_no_tensor_is_above_4d_but_the_window_views_of_swin_and_efficientvit(lowered_model):
    name, _, _, model, _, _ = lowered_model
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in inferred.graph.value_info}
    above = {n.op_type for n in inferred.graph.node for out in n.output if ranks.get(out, 0) > 4}
    assert above <= ABOVE_4D.get(name, set())


@pytest.mark.slow
def test_without_the_rewrite_the_table_sends_these_nodes_to_the_cpu(lowered_model):
    name, *_, raw = lowered_model
    assert raw["summary"]["cpu"] == RAW_CPU[name]


def test_q_k_and_v_become_three_projections_whose_weights_are_the_fused_weights_rows(tmp_path):
    from onnx import helper

    program = deit("deit_tiny_patch16_224", depth=1)
    model, _, rewrites = bpu_onnx(program, FACTS, tmp_path / "model.onnx")
    assert not {"Split", "Squeeze"} & {n.op_type for n in model.graph.node}
    assert rewrites["q, k and v split along axis 0 of a 5-D tensor -> three projections"] == 1  # one block
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    rows = []
    for gemm in (n for n in model.graph.node if n.op_type == "Gemm" and "/piece_" in n.name):
        trans_b = next((helper.get_attribute_value(a) for a in gemm.attribute if a.name == "transB"), 0)
        rows.append(weights[gemm.input[1]] if trans_b else weights[gemm.input[1]].T)
    assert len(rows) == 3  # q, k, v, in that order
    fused = program.graph.get_submodule("blocks.0.attn.qkv").weight.detach().numpy()
    assert np.array_equal(np.concatenate(rows), fused)


def test_a_one_hot_of_computed_indices_gathers_rows_of_the_identity():
    from onnx import TensorProto, helper

    nodes = [helper.make_node("TopK", ["x", "k"], ["values", "index"], "topk", axis=-1),
             helper.make_node("Unsqueeze", ["index"], ["column"], "column", axes=[-1]),
             helper.make_node("Equal", ["column", "arange"], ["hit"], "equal"),
             helper.make_node("Cast", ["hit"], ["y"], "onehot", to=TensorProto.FLOAT),
             helper.make_node("Cast", ["index"], ["z"], "as_float", to=TensorProto.FLOAT)]
    inits = [onnx.numpy_helper.from_array(np.array([3], np.int64), "k"),
             onnx.numpy_helper.from_array(np.arange(5, dtype=np.int64), "arange")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6)
    x = {"x": np.array([[0.3, 0.9, 0.1, 0.5, 0.7]], np.float32)}
    rewritten = bpu_native(model)
    expected = [np.eye(5, dtype=np.float32)[[1, 4, 3]][None], np.array([[1, 4, 3]], np.float32)]
    for m in (model, rewritten):
        found = _run(m, x)
        assert np.array_equal(found[0], expected[0]) and np.array_equal(found[1], expected[1])
    assert {n.op_type for n in rewritten.graph.node} == {"TopK", "Unsqueeze", "Expand", "GatherElements"}
    assert check_ops(rewritten, FACTS, set())["summary"]["cpu"] == 0


def _run(model, feed):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
