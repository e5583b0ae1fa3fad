"""format = onnx: torch.onnx export, simplified by onnxslim, checked in ONNX Runtime.

    target cpu { device = cpu, format = onnx, opset = 17, tolerance = 1e-4 }
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

from evc.artifact import Artifact
from evc.params import Float, Int, Param
from evc.registry import Export, Format, Runtime, register_format

INPUT_NAME, OUTPUT_NAME = "input", "logits"


@register_format(
    "onnx",
    Param("opset", Int(11, 21), 17, "ONNX opset to export at"),
    Param("tolerance", Float(0, open_low=True), 1e-4,
          "largest max abs diff from PyTorch that passes parity"),
)
class Onnx(Format, Runtime, Export):
    """ONNX, exported with torch.onnx, simplified with onnxslim, checked in ONNX Runtime."""

    def lower(self, program, target, out_dir: Path, ctx) -> list[Artifact]:
        path = out_dir / "model.onnx"
        export_onnx(program, path, target.params["opset"])
        return [Artifact(Path(path.name), "onnx", details={"opset": target.params["opset"],
                                                          "ops": op_counts(path)})]

    def export(self, program, path: Path) -> None:
        """The model alone as ONNX, as this format lowers it at its default opset: for timing outside a target."""
        export_onnx(program, path, 17)

    def session(self, path: Path, threads: int | None = None):
        return session(path, threads)

    def check_parity(self, parity, params, artifact) -> str | None:
        return parity.beyond(params["tolerance"])


def session(path: Path, threads: int | None = None, fused: bool = True):
    """run(x) for one input batch, in ONNX Runtime on this machine's CPU.

    `fused = False` keeps ONNX Runtime from fusing QuantizeLinear/DequantizeLinear
    pairs into its int8 kernels: it then evaluates them as rounding in float, with
    exact 32-bit sums as an NPU accumulates. Fused, x86 hosts without VNNI sum
    8-bit products in 16 bits, which can saturate, so the same model's numbers
    would depend on the host's instruction set.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort_session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = ort_session.get_inputs()[0].name
    return lambda x: ort_session.run(None, {name: x})[0]


def export_onnx(program, path: Path, opset: int) -> None:
    """Export at batch 1 with stable node names, then simplify in place with onnxslim."""
    # torch.onnx writes scaled_dot_product_attention only from opset 14 on, and
    # then computes its scale from shapes at run time: spelled out, attention
    # exports at any opset with the scale a constant.
    export_module(explicit_attention(program.graph), (program.example(),), path, opset)


def export_module(module, args: tuple, path: Path, opset: int = 17, inputs: tuple[str, ...] = (INPUT_NAME,)) -> None:
    """`module` on `args` as ONNX, its inputs named `inputs` and its output `logits`, simplified by onnxslim."""
    import onnx
    import onnxslim
    import torch

    raw = path.with_suffix(".raw.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about asserts on static shapes
        # The TorchScript exporter keeps node names stable across builds and
        # still writes opset 11, which device toolchains (RDK X5) require.
        torch.onnx.export(module, args, str(raw), dynamo=False, opset_version=opset, input_names=list(inputs),
                          output_names=[OUTPUT_NAME])
    slim = onnxslim.slim(str(raw))
    onnx.save(slim, str(path))
    raw.unlink()


def explicit_attention(graph_module):
    """A copy of `graph_module` whose scaled_dot_product_attention calls are spelled out."""
    import torch.nn.functional as F

    from evc.surgery import copy_graph, spell_out_attention

    gm = copy_graph(graph_module)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            spell_out_attention(gm, node)
    gm.recompile()
    return gm


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(sorted(Counter(node.op_type for node in graph.node).items()))
