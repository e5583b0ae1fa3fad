"""format = pte: ExecuTorch, delegated to XNNPACK, checked in ExecuTorch's runtime.

    target cpu   { device = cpu, format = pte }
    target phone { device = android, format = pte, quantize = int8, calibrate = calib }

The Program's graph, its attention spelled out as the onnx format spells it,
is captured by torch.export and lowered by `to_edge_transform_and_lower`
with ExecuTorch's XnnpackPartitioner: every run of operators XNNPACK takes
becomes one delegate partition, and what it does not take stays in the
portable graph, run by ExecuTorch's portable kernels. `model.pte` takes
float32 `input` and gives float32 logits at both modes:

    none   fp32
    int8   ExecuTorch's own quantizer flow: XNNPACKQuantizer with its symmetric config
           (int8 weights per output channel, int8 activations per tensor), torchao's
           prepare_pt2e / convert_pt2e, activation ranges calibrated on the
           `calibrate` images; the quantize/dequantize pairs fold into XNNPACK's
           int8 kernels

Where each operator runs is counted from the lowered program (delegation.py):
the manifest keeps the counts per operator, `delegation.json` in the bundle
also names every node left portable and the module it came from. For a ViT
XNNPACK takes the patch embedding, every Linear, the attention's batched
matmuls and softmax, GELU and the residual adds; LayerNorm (XNNPACK has no
LayerNorm in ExecuTorch 1.5), the class token's expand and select, and the
squeezes around each attention stay portable (docs/targets.md, "pte").

Parity against PyTorch, in ExecuTorch's runtime here: at quantize = none the
max abs diff within `tolerance`; at int8 the worst cosine and top-1 agreement
in THRESHOLDS below, unless the target sets its own. Where the numbers come
from: worst per-sample cosine of the logits on 8 random images, measured
here (ExecuTorch 1.5.1, an x86 host) on the 2-block test ViT and the
reduced deit_tiny at random weights, a reduced EfficientFormer-L1, and the
test ViT trained on a toy task (tests/targets/test_tflite.py's), whose
predictions are clear:

    none   max abs diff 5e-7 (deit_tiny), 4e-8 (EfficientFormer-L1)
    int8   0.91 (deit_tiny), 0.9999 (EfficientFormer-L1), 0.99 (test ViT trained),
           top-1 100% trained
    collapsed int8, calibrated on blank images: cosine below 0.5 (test ViT trained)

As for tflite's int8, the threshold sits between the worst correct result
and a collapse; top-1 is not judged at random weights (evc/targets/_quantized.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from evc.registry import Export, Format, Placement, Runtime, register_format
from evc.spec.params import Choice, DataRef, Float, Param, When
from evc.targets._quantized import check_quantized, parity_thresholds, threshold_params
from evc.targets.artifact import Artifact

MODES = ("none", "int8")
# Per quantized mode: (worst cosine, top-1 agreement); the docstring says why.
THRESHOLDS = {"int8": (0.8, 0.9)}
MODEL, DELEGATION = "model.pte", "delegation.json"
# ExecuTorch's Python runtime sets XNNPACK's thread count through this call, marked experimental.
THREADS_CALL = "executorch.extension.pybindings.portable_lib._unsafe_reset_threadpool"


@register_format(
    "pte",
    Param("quantize", Choice(MODES), "none",
          "none (fp32) or int8 (XNNPACKQuantizer: int8 weights per channel, int8 activations calibrated on "
          "`calibrate`)"),
    Param("calibrate", DataRef(), None, "images that set activation ranges for quantize = int8",
          needed_when=(When("quantize", ("int8",)),)),
    Param("tolerance", Float(0, open_low=True), 1e-4,
          "largest max abs diff from PyTorch that passes parity at quantize = none"),
    *threshold_params(THRESHOLDS),
)
class Pte(Format, Runtime, Export, Placement):
    """ExecuTorch .pte, delegated to XNNPACK, quantized by its XNNPACKQuantizer, checked in its runtime."""

    def lower(self, program, target, out_dir: Path, ctx) -> list[Artifact]:
        from evc.targets._executorch import delegation, delegation_summary, version
        from evc.targets.onnx import calibration

        params = target.params
        mode = params["quantize"]
        images = calibration(target, MODEL, ctx) if mode == "int8" else None
        edge = to_edge(program, images)
        placed = delegation(edge)
        (out_dir / MODEL).write_bytes(edge.to_executorch().buffer)
        (out_dir / DELEGATION).write_text(json.dumps(placed, indent=1) + "\n")
        return [Artifact(Path(MODEL), "pte", details={
            "quantize": mode, "executorch": version(), "threads_set_by": THREADS_CALL,
            "parity_thresholds": parity_thresholds(params, THRESHOLDS, random_weights=ctx.random_weights),
            "delegation": delegation_summary(placed), "placement": placement_of(placed, mode)})]

    def placement(self, program, target) -> dict:
        """Which operators of `program` XNNPACK takes and which stay portable, as `target` lowers it, writing no
        bundle; at int8 calibrated on random images, as which operators XNNPACK takes does not depend on ranges."""
        import numpy as np

        from evc.targets._executorch import delegation

        mode = target.params["quantize"]
        images = None
        if mode == "int8":
            images = np.random.default_rng(0).standard_normal((2, *program.input.shape[1:]), dtype=np.float32)
        return placement_of(delegation(to_edge(program, images)), mode)

    def session(self, path: Path, threads: int | None = None):
        """run(x) for one input batch, in ExecuTorch's runtime on this machine's CPU. `threads` sets XNNPACK's
        thread pool, the process's own, before the program is loaded: its XNNPACK partitions keep the pool they
        were loaded with, so a session made at another count leaves the earlier ones unusable."""
        import numpy as np
        import torch
        from executorch.runtime import Runtime as Executorch

        from evc.targets._executorch import set_threads
        from evc.targets.tflite import quiet

        with quiet():  # the runtime reports, in C++, what it reads of the CPU and each thread pool it makes
            if threads:
                set_threads(threads)
            method = Executorch.get().load_program(Path(path)).load_method("forward")
        return lambda x: np.asarray(method.execute([torch.from_numpy(np.ascontiguousarray(x, np.float32))])[0])

    def check_parity(self, parity, params, artifact) -> str | None:
        return check_quantized(parity, params["quantize"], artifact.details["parity_thresholds"])

    def export(self, program, path: Path) -> None:
        """The model alone as an fp32 .pte, as this format lowers it: for timing outside a target."""
        path.write_bytes(to_edge(program).to_executorch().buffer)

    def export_module(self, module, args: tuple, path: Path, inputs: tuple[str, ...]) -> None:
        from evc.targets._executorch import lowered_module

        path.write_bytes(lowered_module(module, args).to_executorch().buffer)


def placement_of(placed: dict, mode: str) -> dict:
    """The delegation as `evc explain` and the report show an operator check: operators in XNNPACK's partitions
    and in the portable graph (quantize/dequantize apart), and each portable node with the module it came from."""
    from evc.targets._executorch import QUANTIZE_NAMESPACE, version

    quantize = placed["quantize_ops"]
    return {"march": f"ExecuTorch {version()}, {placed['partitions']} XNNPACK partitions, quantize = {mode}",
            "summary": {"xnnpack": placed["delegated"], "portable": placed["portable"]}, "unsupported": [],
            "quantize_ops": quantize,
            "cpu": [{"node": n["node"], "op": n["op"], "on": "portable",
                     "why": "not taken by XnnpackPartitioner: a portable kernel" + _origin(n)}
                    for n in placed["portable_nodes"] if not n["op"].startswith(QUANTIZE_NAMESPACE)]}


def _origin(node: dict) -> str:
    """Where a portable node came from: the model's module, else the Program's graph node it descends from."""
    if node["module"]:
        return f", from {node['module']}"
    return f", from node {node['from']}" if node["from"] else ""


def to_edge(program, images=None):
    """`program` lowered to XNNPACK (an EdgeProgramManager): fp32, or int8 calibrated on `images` (N×3×H×W)."""
    from evc.targets._executorch import lowered_module
    from evc.targets.onnx import explicit_attention

    # Attention spelled out stays on XNNPACK whole: torch.export decomposes scaled_dot_product_attention with a
    # guard against fully masked rows (eq, any, logical_not, where) that XNNPACK does not take.
    return lowered_module(explicit_attention(program.graph), (program.example(),), images)


def latency_ms(path: Path, threads: int = 1, runs: int = 50, warmups: int = 10) -> dict:
    """A .pte timed here in ExecuTorch's runtime at `threads` (XNNPACK's thread pool): median and p90 ms,
    images per second, on a fixed random input of the model's own shape.

        Pte().export(program, Path("model.pte")); latency_ms(Path("model.pte"))["median_ms"]
    """
    import numpy as np
    from executorch.runtime import Runtime as Executorch

    from evc.runtime.timing import measure

    meta = Executorch.get().load_program(Path(path)).load_method("forward").metadata
    shape = list(meta.input_tensor_meta(0).sizes())
    feed = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    return {"threads": threads, **measure(Pte().session(path, threads), feed, runs, warmups)}

