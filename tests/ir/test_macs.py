import math

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch

from evc.ir.macs import node_macs, params_of, summarize
from evc.ir.recognise import recognise
from evc.ir.trace import trace

EXAMPLE = torch.randn(1, 3, 224, 224)


@pytest.fixture(scope="module")
def deit_tiny():
    return timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()


@pytest.fixture(scope="module")
def traced(deit_tiny):
    gm = trace(deit_tiny, EXAMPLE)
    return gm, recognise(gm)


@pytest.fixture(scope="module")
def summary(traced):
    gm, structure = traced
    return summarize(gm, structure, EXAMPLE)


def onnx_macs(model, example, path) -> int:
    """MACs of `model` counted from the shapes in its exported ONNX graph (`onnx_file_macs`)."""
    torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17)
    return onnx_file_macs(path)


_COUNTED = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum")


def onnx_file_macs(path) -> int:
    """MACs of MatMul, Gemm, Conv, ConvTranspose and Einsum in an ONNX graph, from the shapes its tensors
    take when ONNX Runtime runs it (shape inference loses some reshapes' sizes)."""
    model = onnx.load(str(path))
    graph = model.graph
    nodes = [node for node in graph.node if node.op_type in _COUNTED]
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    shown = {o.name for o in graph.output}
    for name in dict.fromkeys(n for node in nodes for n in (*node.input[:2], node.output[0])):
        if name not in shapes and name not in shown:
            graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    run = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: np.zeros(i.shape, np.float32) for i in run.get_inputs()}
    shapes.update({o.name: list(v.shape) for o, v in zip(run.get_outputs(), run.run(None, feed))})
    total = 0
    for node in nodes:
        out = math.prod(shapes[node.output[0]])
        if node.op_type == "MatMul":
            total += out * shapes[node.input[0]][-1]
        elif node.op_type == "Gemm":
            trans_a = any(a.name == "transA" and a.i for a in node.attribute)
            total += out * shapes[node.input[0]][0 if trans_a else -1]
        elif node.op_type == "Conv":
            total += out * math.prod(shapes[node.input[1]][1:])
        elif node.op_type == "ConvTranspose":  # each input element reaches a kernel's outputs per group
            total += math.prod(shapes[node.input[0]]) * math.prod(shapes[node.input[1]][1:])
        else:  # one multiply-add per combination of the equation's letters
            equation = next(a.s.decode() for a in node.attribute if a.name == "equation").replace(" ", "")
            sizes = {letter: size for term, name in zip(equation.split("->")[0].split(","), node.input)
                     for letter, size in zip(term, shapes[name])}
            total += math.prod(sizes.values())
    return total


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_deit_tiny_macs_match_an_onnx_count_within_1_percent(deit_tiny, summary, tmp_path):
    independent = onnx_macs(deit_tiny, EXAMPLE, tmp_path / "deit_tiny.onnx")
    assert summary.macs == pytest.approx(independent, rel=0.01)
    assert summary.macs == pytest.approx(1.254e9, rel=0.001)


def test_scaled_dot_product_attention_on_cpu_is_counted(traced):
    gm, structure = traced
    macs = node_macs(gm, EXAMPLE)
    tokens, dim = 197, 192
    assert macs[structure.blocks[0].attn.score_node] == 2 * tokens * tokens * dim


def test_stem_blocks_and_head_add_up_to_the_total(summary):
    parts = [summary.stem, *summary.blocks, summary.head]
    assert sum(p.macs for p in parts) == summary.macs
    assert sum(p.params for p in parts) == summary.params


def test_every_block_of_deit_tiny_costs_the_same(summary):
    assert len({(b.heads, b.hidden, b.tokens, b.params, b.macs) for b in summary.blocks}) == 1
    assert (summary.blocks[0].heads, summary.blocks[0].hidden, summary.blocks[0].tokens) == (3, 768, 197)


def test_params_match_the_model_parameter_count(deit_tiny, summary):
    assert summary.params == sum(p.numel() for p in deit_tiny.parameters())


def test_params_of_counts_named_modules_and_parameters_once(traced):
    gm, _ = traced
    qkv = 192 * 576 + 576
    assert params_of(gm, ["blocks.0.attn.qkv", "blocks.0.attn.qkv.weight"]) == qkv
    assert params_of(gm, ["cls_token"]) == 192


def test_summary_to_dict_lists_each_block(summary):
    data = summary.to_dict()
    assert len(data["blocks"]) == 12
    assert data["total"]["macs"] == summary.macs


def test_each_block_splits_into_attention_and_mlp_as_counted_by_hand(deit_tiny, summary):
    tokens, dim, hidden = 197, 192, 768
    attention = tokens * dim * 3 * dim + tokens * dim * dim + 2 * tokens * tokens * dim  # qkv, proj, q@k, p@v
    block = deit_tiny.blocks[0]
    for cost in summary.blocks:
        assert (cost.parts.attention.macs, cost.parts.mlp.macs, cost.parts.tokens.macs) == (
            attention, 2 * tokens * dim * hidden, 0)
        assert cost.parts.attention.params == sum(p.numel() for m in (block.norm1, block.attn) for p in m.parameters())
        assert cost.parts.mlp.params == sum(p.numel() for m in (block.norm2, block.mlp) for p in m.parameters())


class LatentQuery(torch.nn.Module):
    """timm's attention pool: a learned query, expanded to the batch (a view of a parameter under no_grad)."""

    def __init__(self):
        super().__init__()
        self.latent = torch.nn.Parameter(torch.randn(1, 1, 8))
        self.q, self.k = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.q(self.latent.expand(x.shape[0], -1, -1)) + self.k(x)


def test_what_weights_and_sizes_alone_compute_costs_nothing_per_image():
    """The learned query's projection is a constant in an exported model; only k reads the image."""
    gm = trace(LatentQuery(), torch.randn(2, 1, 8))
    macs = node_macs(gm, torch.randn(2, 1, 8))
    assert (macs["q"], macs["k"]) == (0, 2 * 8 * 8)
