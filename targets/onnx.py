"""format = onnx: torch.onnx export, simplified by onnxslim, checked in ONNX Runtime.

    target cpu { device = cpu, format = onnx, opset = 17, tolerance = 1e-4 }
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

from evc.artifact import Artifact
from evc.params import Float, Int, Param
from evc.registry import register_format

INPUT_NAME, OUTPUT_NAME = "input", "logits"


@register_format(
    "onnx",
    Param("opset", Int(11, 21), 17, "ONNX opset to export at"),
    Param("tolerance", Float(0, open_low=True), 1e-4,
          "largest max abs diff from PyTorch that passes parity"),
)
class Onnx:
    """ONNX, exported with torch.onnx, simplified with onnxslim, checked in ONNX Runtime."""

    def lower(self, program, target, out_dir: Path, ctx) -> list[Artifact]:
        path = out_dir / "model.onnx"
        export_onnx(program, path, target.params["opset"])
        return [Artifact(Path(path.name), "onnx", details={"opset": target.params["opset"],
                                                          "ops": op_counts(path)})]

    def export(self, program, path: Path, opset: int = 17) -> None:
        """The model alone as ONNX, as this format lowers it: for timing a program outside a target."""
        export_onnx(program, path, opset)

    def session(self, path: Path, threads: int | None = None):
        """run(x) for one input batch, in ONNX Runtime on this machine's CPU."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]

    def run(self, path: Path, images):
        import numpy as np

        run = self.session(path)
        return np.concatenate([run(x[None]) for x in images])

    def check_parity(self, parity, params, artifact) -> str | None:
        """None if `parity` passes, else why not."""
        if parity.within(params["tolerance"]):
            return None
        return f"max abs diff {parity.max_abs_diff:.3g} exceeds tolerance {params['tolerance']:g}"


def export_onnx(program, path: Path, opset: int) -> None:
    """Export at batch 1 with stable node names, then simplify in place with onnxslim."""
    import onnx
    import onnxslim
    import torch

    # torch.onnx writes scaled_dot_product_attention only from opset 14 on, and
    # then computes its scale from shapes at run time: spelled out, attention
    # exports at any opset with the scale a constant.
    graph = explicit_attention(program.graph)
    raw = path.with_suffix(".raw.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about asserts on static shapes
        # The TorchScript exporter keeps node names stable across builds and
        # still writes opset 11, which device toolchains (RDK X5) require.
        torch.onnx.export(graph, (program.example(),), str(raw), dynamo=False,
                          opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
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
