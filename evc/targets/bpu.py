"""format = bpu: what Horizon's toolchain needs to compile a model for a D-Robotics BPU, checked here.

    target x5 { device = rdk_x5, format = bpu, quantize = int8, calibrate = calib }
    target x5 { device = rdk_x5, format = bpu, calibrate = calib, int16 = [softmax, layernorm] }

The BPU binary is made by `hb_mapper makertbin` on the user's PC, which evc
cannot run. So this backend writes everything that toolchain reads and checks
what it can without it:

- `model.onnx` at the device's opset, lowered into the forms its operator table runs
  (_bpu_native.py: q/k/v as three projections, 4-D views, keepdims, ...);
- `config.yaml` for hb_mapper, every Softmax on the BPU in int16 (`node_info`), and with
  `int16 = [softmax, layernorm]` each LayerNorm's normalising nodes too (_node_info.py);
- `calibration/`, the calibration images as the toolchain reads them;
- `op_check.json`, each node against the device's operator table (its facts);
- `model_int8_proxy.onnx`, the same ONNX quantized by ONNX Runtime as config.yaml
  tells hb_mapper to (_bpu_proxy.py), with the same data: the driver compares it
  with PyTorch, so an int8 collapse shows here.

The proxy's gate, `min_cosine`, judges the mean of its per-image cosines to
PyTorch. The formats that quantize only MatMul, Gemm and Conv judge the worst
image's; every node of the proxy is int8, so here one image's cosine is the
extreme of a wide tail: on the digits ViT trained with four seeds (examples/
digits, 359 val images, `int16 = [softmax, layernorm]`) the worst image's
ranged from 0.78 to 0.98 with no image's top-1 lost, while the mean stayed at
0.994 or above. The mean falls where the model does: LayerNorm's pieces in
int8 cost one seed 12 points of top-1 at a mean of 0.84, and a class token
below int8 resolution gives 0.63 (tests/targets/test_bpu.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from evc.errors import InputError
from evc.registry import DEVICES, Format, Placement, Runtime, register_format
from evc.spec.params import Choice, DataRef, Float, Invalid, ListOf, Param
from evc.targets._bpu_ops import (
    OP_CHECK,
    ShapedGraph,
    attribute,
    check_ops,
    require_supported,
    summary_of,
    uneven_split,
)
from evc.targets._bpu_proxy import quantize_proxy
from evc.targets._node_info import PARTS, node_info_names, parts_named
from evc.targets.artifact import Artifact
from evc.targets.onnx import export_onnx, op_counts

MODEL, PROXY, CONFIG, CALIBRATION = "model.onnx", "model_int8_proxy.onnx", "config.yaml", "calibration"
WORKING_DIR = "model_output"


def _check(values: dict, spans: dict, device: str) -> None:
    """A part the device's node_info has no data for, or one left out whose nodes run on the BPU only when
    node_info names them (Softmax on the X5), is a spec error."""
    facts = DEVICES[device].facts["node_info"]
    parts = values["int16"]
    unknown = [p for p in parts if p not in facts["parts"]]
    if unknown:
        raise Invalid(f"int16: {device} takes no int16 {unknown[0]} (it takes {', '.join(facts['parts'])})",
                      spans.get("int16"))
    table = DEVICES[device].facts["ops"]
    for part, ops in facts["parts"].items():
        gated = [op for op in ops if table.get(op, {}).get("on") == "bpu_with_node_info"]
        if gated and part not in parts:
            raise Invalid(f"int16: {part} cannot be left out: {device}'s BPU runs {', '.join(gated)} only when "
                          "node_info names it, in int16", spans.get("int16"),
                          f"write int16 = [{', '.join((part, *parts))}]")


@register_format(
    "bpu",
    Param("quantize", Choice(("int8",)), "int8", "precision on the BPU: int8 (the `int16` parts in int16)"),
    Param("calibrate", DataRef(), help="images to calibrate int8 ranges with, on the board and in the int8 proxy"),
    Param("tolerance", Float(0, open_low=True), 1e-4,
          "largest max abs diff of model.onnx from PyTorch that passes parity"),
    Param("min_cosine", Float(0, 1), 0.9,
          "mean cosine of the int8 proxy to PyTorch over the validation images, below which the build fails "
          "(only for given weights)"),
    Param("int16", ListOf(Choice(tuple(PARTS)), or_single=True), ("softmax",),
          "parts hb_mapper runs in int16 on the BPU, named in config.yaml's node_info and so kept in the int8 "
          "proxy: softmax (every Softmax, which runs on the BPU only so named), layernorm (each LayerNorm's "
          "normalising nodes, ReduceMean to Div)"),
    check=_check,
)
class Bpu(Format, Runtime, Placement):
    """ONNX, config, calibration data and operator check for Horizon's BPU toolchain, with an int8 proxy."""

    def lower(self, program, target, out_dir: Path, ctx) -> list[Artifact]:
        facts = DEVICES[target.device].facts
        image = program.input
        if facts["runtime_input"]["even_height_width"] and (image.height % 2 or image.width % 2):
            raise InputError(f"target '{target.name}': the {facts['runtime_input']['type']} camera input of "
                             f"{target.device} needs an even height and width, not {image.height}x{image.width}")
        model_path = out_dir / MODEL
        parts = target.params["int16"]
        model, int16, rewrites = bpu_onnx(program, facts, model_path, parts)
        report = check_ops(model, facts, set(int16))
        (out_dir / OP_CHECK).write_text(json.dumps(report, indent=1) + "\n")
        require_supported(report, facts)

        images = ctx.images(target.params["calibrate"])
        write_calibration(images, image, out_dir / CALIBRATION)
        prefix = ctx.model_name
        # A dict of its own per node: YAML would write one shared dict as anchor and aliases.
        settings = {name: dict(facts["node_info"]["setting"]) for name in int16}
        (out_dir / CONFIG).write_text(_yaml(hb_mapper_config(facts, image, prefix, settings)))
        import yaml

        config = yaml.safe_load((out_dir / CONFIG).read_text())  # the proxy reads what the toolchain will
        bpu_ops = {n["op"] for n in report["nodes"] if n["on"] == "bpu"}
        plan = quantize_proxy(model_path, out_dir / PROXY, images, config, bpu_ops, facts["node_info"]["renamed"])

        toolchain = {"march": facts["march"], "config": CONFIG, "calibration": CALIBRATION,
                     "calibration_samples": len(images), "output": f"{WORKING_DIR}/{prefix}.bin"}
        gated = not ctx.random_weights
        return [
            Artifact(Path(MODEL), "onnx", details={
                "opset": facts["onnx"]["opset"], "ops": op_counts(model_path), "toolchain": toolchain,
                "node_info": int16, "int16": parts_named(model, facts, parts), "op_check": summary_of(report),
                "bpu_rewrites": rewrites}),
            Artifact(Path(PROXY), "onnx", details={
                "quantize": target.params["quantize"], "proxy": PROXY_RECIPE,
                "calibration": {"type": config["calibration_parameters"]["calibration_type"],
                                "method": plan["calibrate"][0]},
                "int16_tensors": len(plan["int16"]), "quantized_ops": plan["op_types"],
                "gate": {"min_cosine": target.params["min_cosine"], "applied": gated,
                         **({} if gated else {"why_not": RANDOM_WEIGHTS_NOTE, "summary": RANDOM_WEIGHTS_SUMMARY})}}),
        ]

    def session(self, path: Path, threads: int | None = None):
        """run(x) in ONNX Runtime; the int8 proxy's quantize-dequantize pairs evaluated in float."""
        from evc.targets.onnx import session

        return session(path, threads, fused=path.name != PROXY)

    def check_parity(self, parity, params, artifact) -> str | None:
        """model.onnx passes within `tolerance`; the int8 proxy fails only on a collapse below `min_cosine`."""
        if "quantize" not in artifact.details:
            return parity.beyond(params["tolerance"])
        if not artifact.details["gate"]["applied"] or parity.mean_cosine >= params["min_cosine"]:
            return None
        reason = (f"the int8 proxy collapsed: mean cosine to PyTorch {parity.mean_cosine:.4f} over "
                  f"{parity.samples} images is below min_cosine {params['min_cosine']:g} "
                  f"(the worst image's: {parity.cosine:.4f})")
        if "layernorm" not in params["int16"]:
            reason += ("; LayerNorm's pieces are int8 here, and int16 = [softmax, layernorm] puts them in int16 "
                       "(docs/targets.md)")
        return reason

    def placement(self, program, target) -> dict:
        """The operator check of `program` for `target`'s device, as the manifest keeps it, writing no bundle."""
        import tempfile  # here, as plug-ins stay light to import (evc.registry)

        facts = DEVICES[target.device].facts
        with tempfile.TemporaryDirectory() as tmp:
            model, int16, _ = bpu_onnx(program, facts, Path(tmp) / MODEL, target.params["int16"])
        return summary_of(check_ops(model, facts, set(int16)))


PROXY_RECIPE = ("onnxruntime quantize_static, QDQ, as config.yaml tells hb_mapper: activations calibrated per "
                "tensor as its calibration_type says (max: the largest magnitude) on the calibrate data, int8 "
                "symmetric, into and out of every node the op check puts on the BPU; weights int8 symmetric "
                "per output channel; the inputs and outputs of the nodes node_info names int16; run with each "
                "QuantizeLinear/DequantizeLinear evaluated in float, not fused into int8 kernels, so its "
                "figures are the same on any x86 host")
RANDOM_WEIGHTS_SUMMARY = ("the weights are random, and a random ViT's class token (~1e-6) is below int8 "
                          "resolution, so the int8 proxy's error says nothing of a trained model's")
RANDOM_WEIGHTS_NOTE = ("the model is randomly initialised, so its int8 cosine says nothing of the trained "
                       "model's (a random ViT's class token, ~1e-6, is below int8 resolution): reported, not gated")


# ---- the files Horizon's toolchain reads -------------------------------------------------------

def bpu_onnx(program, facts: dict, path: Path, int16=("softmax",)) -> tuple:
    """Export `program` to `path` at the device's opset, rewritten for its BPU; (the model, the node_info names
    of the `int16` parts, how many nodes each rewrite replaced)."""
    import onnx

    export_onnx(program, path, facts["onnx"]["opset"])
    rewrites = {}
    model = lowered_for_the_bpu(onnx.load(str(path)), facts, rewrites)
    onnx.save(model, str(path))
    return model, node_info_names(model, facts, int16), rewrites


def lowered_for_the_bpu(model, facts: dict, rewrites: dict | None = None):
    """The exported `model` in the forms the BPU's operator table runs, value for value (_bpu_native.py);
    `rewrites` gets how many nodes each rewrite of _bpu_native.py replaced."""
    from evc.targets._bpu_native import bpu_native  # numpy and onnx-graphsurgeon: not on `evc check`'s path

    for_the_bpu(model, facts)
    return bpu_native(model, rewrites)


def hb_mapper_config(facts: dict, image, prefix: str, node_info: dict) -> dict:
    """config.yaml for `hb_mapper makertbin`: the toolchain normalises 0–255 pixels as (x − mean) × scale."""
    return {
        "model_parameters": {
            "onnx_model": MODEL,
            "march": facts["march"],
            "working_dir": WORKING_DIR,
            "output_model_file_prefix": prefix,
            "node_info": node_info,
        },
        "input_parameters": {
            "input_name": "input",
            "input_shape": "x".join(map(str, (1, 3, image.height, image.width))),
            "input_type_rt": facts["runtime_input"]["type"],
            "input_type_train": "rgb",
            "input_layout_train": "NCHW",
            "norm_type": "data_mean_and_scale",
            # Horizon's configs write per-channel values space-separated.
            "mean_value": " ".join(f"{m * 255:.10g}" for m in image.mean),
            "scale_value": " ".join(f"{1 / (s * 255):.10g}" for s in image.std),
        },
        "calibration_parameters": {
            "cal_data_dir": f"./{CALIBRATION}",
            "cal_data_type": "float32",
            "calibration_type": "max",
        },
        "compiler_parameters": {
            "compile_mode": "latency",
            "optimize_level": "O3",
        },
    }


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=1 << 16)


def write_calibration(images, image, folder: Path) -> None:
    """One raw float32 NCHW file per image, RGB in 0–255: the model's normalisation is the toolchain's to apply."""
    import numpy as np

    folder.mkdir()
    mean = np.asarray(image.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(image.std, dtype=np.float32).reshape(1, 3, 1, 1)
    pixels = (images * std + mean) * 255
    for i, picture in enumerate(pixels):
        picture[None].astype(np.float32).tofile(folder / f"{i:05d}.rgbchw")


def for_the_bpu(model, facts: dict) -> None:
    """Rewrite, value for value, what the BPU's operator table would send to the CPU and can be said otherwise.

    A Softmax below the rank the BPU wants gets leading 1s (at opset 11 Softmax
    coerces to 2-D at its axis, so they change no value); where the BPU splits
    only evenly, an uneven Split becomes one Slice per part. A rewritten node
    keeps its name, or lends it as a prefix to the nodes that replace it.
    """
    from onnx import shape_inference

    graph = ShapedGraph(shape_inference.infer_shapes(model))
    softmax_rank = facts["ops"]["Softmax"].get("rank", [0])[0]
    even_split = facts["ops"]["Split"].get("even")
    nodes = []
    for node in model.graph.node:
        rank = graph.rank(node.input[0]) if node.input else None
        if node.op_type == "Softmax" and rank is not None and rank < softmax_rank:
            nodes += _softmax_lifted(node, rank, softmax_rank)
        elif node.op_type == "Split" and even_split and uneven_split(node, None, graph):
            nodes += _split_as_slices(model, node)
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _softmax_lifted(node, rank: int, lifted_rank: int) -> list:
    from onnx import helper

    pad = list(range(lifted_rank - rank))
    axis = attribute(node, "axis")
    axis = axis + rank if axis < 0 else axis
    lifted, result = f"{node.name}/lifted_input", f"{node.name}/lifted_output"
    return [helper.make_node("Unsqueeze", [node.input[0]], [lifted], f"{node.name}/unsqueeze", axes=pad),
            helper.make_node("Softmax", [lifted], [result], node.name, axis=axis + len(pad)),
            helper.make_node("Squeeze", [result], [node.output[0]], f"{node.name}/squeeze", axes=pad)]


def _split_as_slices(model, node) -> list:
    import numpy as np
    from onnx import helper, numpy_helper

    axis = attribute(node, "axis")
    sizes = attribute(node, "split")
    starts = np.cumsum([0, *sizes])
    slices = []
    for i, out in enumerate(node.output):
        name = f"{node.name}/slice_{i}"
        bounds = [f"{name}/{k}" for k in ("starts", "ends", "axes")]
        for tensor, value in zip(bounds, (starts[i], starts[i + 1], axis)):
            model.graph.initializer.append(numpy_helper.from_array(np.array([value], dtype=np.int64), tensor))
        slices.append(helper.make_node("Slice", [node.input[0], *bounds], [out], name))
    return slices
