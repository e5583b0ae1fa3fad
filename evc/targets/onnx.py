"""format = onnx: torch.onnx export, simplified by onnxslim, checked in ONNX Runtime.

    target cpu { device = cpu, format = onnx, opset = 17, tolerance = 1e-4 }
    target cpu { device = cpu, format = onnx, quantize = int8, calibrate = calib }
    target cpu { device = cpu, format = onnx, quantize = dynamic }

On a cpu target, `quantize` rewrites the exported model with ONNX Runtime's
quantization tools (evc/targets/_onnx_quantize.py says the recipe):

    int8     static: int8 weights and uint8 activations as QuantizeLinear/DequantizeLinear
             pairs (QDQ), activation ranges calibrated on the `calibrate` images;
             written as model_int8.onnx
    dynamic  int8 weights; each MatMul's input quantized at run time
             (DynamicQuantizeLinear, MatMulInteger); written as model_dynamic.onnx

Both take and give float32, as model.onnx does. Parity against PyTorch is then
judged as tflite's quantized modes are (evc/targets/_quantized.py): the worst
cosine and top-1 agreement in THRESHOLDS below, unless the target sets its own.

Where the numbers come from: worst per-sample cosine of the logits, measured
on the 2-block test ViT and deit_small at random weights, on the test ViT
trained on a toy task (tests/targets/test_cpu_quantize.py uses it) and on the
digits ViT (examples/digits, its 359 validation images), in ONNX Runtime's
fused int8 kernels on an AVX-512 VNNI host; in brackets the worst of the test
ViT, digits and deit_small with every QDQ pair evaluated by plain float
operators instead (ORT_ENABLE_BASIC: another rounding path altogether):

    dynamic  0.99859 (test ViT), 0.99996 (toy), 0.99910 (digits), 0.99812 (deit_small)
             [0.99807, with the patch embedding's Conv left float]; top-1 100% on the
             trained two
    int8     0.99684 (test ViT), 0.99989 (toy), 0.99550 (digits), 0.99628 (deit_small)
             [0.99511]; top-1 100% on the trained two (digits: no validation image lost)
    collapsed int8: calibrated on all-zero images 0.21 (test ViT), on dim noise
             (pixels 0 to 8 of 255) -0.08 (toy)

Both thresholds sit at least ten times the worst loss away from 1 (int8: 1 -
0.95 = 10 × 0.0049), far above a collapse. The integer sums are exact on every
x86 CPU (weights use 7 bits, so AVX2's 16-bit pair sums cannot saturate):
what remains between hosts is float rounding, which the bracketed figures
bound. Flat calibration images fail the build before parity, saying so.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

from evc.errors import BuildError
from evc.registry import Export, Format, Runtime, register_format
from evc.spec.params import Choice, DataRef, Float, Int, Invalid, Param, When
from evc.targets._quantized import check_quantized, parity_thresholds, threshold_params
from evc.targets.artifact import Artifact

INPUT_NAME, OUTPUT_NAME = "input", "logits"
MODES = ("none", "int8", "dynamic")
# Per quantized mode: (worst cosine, top-1 agreement); the docstring says why.
THRESHOLDS = {"int8": (0.95, 0.9), "dynamic": (0.98, 0.9)}
QUANTIZE_DEVICES = ("cpu",)  # the devices whose runtime is ONNX Runtime itself
QUANTIZE_OPSET = 13  # per-channel QuantizeLinear needs its `axis`


def _check(values: dict, spans: dict, device: str) -> None:
    mode = values["quantize"]
    if mode == "none":
        return
    if device not in QUANTIZE_DEVICES:
        raise Invalid(f"quantize = {mode} is ONNX Runtime's quantization, for device = cpu; device '{device}' "
                      "runs the ONNX in its own runtime", spans.get("quantize"),
                      "a jetson sets TensorRT's precision with `precision`" if device == "jetson" else None)
    if values["opset"] < QUANTIZE_OPSET:
        raise Invalid(f"quantize = {mode} needs opset {QUANTIZE_OPSET} or later (per-channel int8 weights); "
                      f"opset is {values['opset']}", spans.get("opset"))


@register_format(
    "onnx",
    Param("opset", Int(11, 21), 17, "ONNX opset to export at"),
    Param("quantize", Choice(MODES), "none",
          "none (fp32), int8 (static QDQ: int8 weights, uint8 activations calibrated on `calibrate`) or dynamic "
          "(int8 weights, activations quantized at run time); ONNX Runtime's quantization, device = cpu only"),
    Param("calibrate", DataRef(), None, "images that set activation ranges for quantize = int8",
          needed_when=(When("quantize", ("int8",)),)),
    Param("tolerance", Float(0, open_low=True), 1e-4,
          "largest max abs diff from PyTorch that passes parity at quantize = none"),
    *threshold_params(THRESHOLDS),
    check=_check,
)
class Onnx(Format, Runtime, Export):
    """ONNX, exported with torch.onnx, simplified with onnxslim, quantized by ONNX Runtime, checked in it."""

    def lower(self, program, target, out_dir: Path, ctx) -> list[Artifact]:
        params = target.params
        mode = params["quantize"]
        path = out_dir / "model.onnx"
        export_onnx(program, path, params["opset"])
        details = {"opset": params["opset"], "quantize": mode,
                   "parity_thresholds": parity_thresholds(params, THRESHOLDS, ctx.random_weights)}
        if mode != "none":
            from evc.targets._onnx_quantize import RECIPE, int8_report, quantize

            fp32, path = path, out_dir / f"model_{mode}.onnx"
            images = calibration(target, path.name, ctx) if mode == "int8" else None
            quantize(fp32, path, mode, images)
            fp32.unlink()
            details.update(recipe=RECIPE[mode], **int8_report(path))
        return [Artifact(Path(path.name), "onnx", details={**details, "ops": op_counts(path)})]

    def export(self, program, path: Path) -> None:
        """The model alone as ONNX, as this format lowers it at its default opset: for timing outside a target."""
        export_onnx(program, path, 17)

    def export_module(self, module, args: tuple, path: Path, inputs: tuple[str, ...]) -> None:
        export_module(module, args, path, inputs=inputs)

    def session(self, path: Path, threads: int | None = None):
        return session(path, threads)

    def check_parity(self, parity, params, artifact) -> str | None:
        limits = artifact.details.get("parity_thresholds") or {"max_abs_diff": params["tolerance"]}
        reason = check_quantized(parity, params["quantize"], limits)
        if reason and params["quantize"] == "int8":
            reason += f" (do the calibrate images, data '{params['calibrate']}', look like the validation images?)"
        return reason


def calibration(target, artifact: str, ctx):
    """The `calibrate` images; BuildError if every one is a single flat colour. Ranges calibrated on flat
    images collapse (an all-zero set gives the test ViT cosine 0.21), and what went wrong is plainer said
    of the data than of the parity it ruins."""
    images = ctx.images(target.params["calibrate"])
    if float(images.reshape(len(images), images.shape[1], -1).std(axis=-1).max()) < 1e-6:
        raise BuildError(f"target '{target.name}': {artifact}: calibrate = {target.params['calibrate']}: all "
                         f"{len(images)} images are flat, one colour each, so the activation ranges calibrated "
                         "on them collapse and int8 would saturate on real images; calibrate on images like "
                         "those the model will see")
    return images


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

    from evc.passes.surgery import copy_graph, spell_out_attention

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
