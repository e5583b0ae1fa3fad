"""format = tflite: litert-torch conversion, ai-edge-quantizer, checked in the LiteRT interpreter.

    target phone { device = android, format = tflite, quantize = dynamic }
    target phone { device = android, format = tflite, quantize = int8, calibrate = calib }

litert-torch converts the Program's graph (torch.export under the hood; no
TensorFlow) into an fp32 flatbuffer whose signature reads `input` → `logits`;
attention lowers to BATCH_MATMUL and SOFTMAX, GELU to the GELU builtin.
A quantized mode then rewrites that flatbuffer with ai-edge-quantizer:

    float16  weights stored as fp16 (half the size), dequantized to fp32 at load
    dynamic  dynamic range: int8 per-channel weights, activations quantized on the fly
    int8     full integer: int8 weights and activations, int8 input and output;
             activation ranges calibrated on the `calibrate` images

Parity against PyTorch on the target's `validate` images: at quantize = none
the max abs diff within `tolerance`; a quantized mode must reach the worst
cosine and top-1 agreement in THRESHOLDS below, unless the target sets its own.

Where the numbers come from: worst per-sample cosine of the logits, measured
on the 2-block test ViT and on deit_small (heads 2/3, MLP 75%) at random
weights, and on the test ViT trained on a toy task so that its predictions
are clear (tests/targets/test_tflite.py trains it):

    float16  0.9999998 on all three; top-1 100%
    dynamic  0.9994 (test ViT), 0.9993 (deit_small), 0.99995 (trained); top-1 100% trained
    int8     0.87 to 0.91 / 0.93 / 0.67 to 0.78 trained (LayerNorm, softmax and GELU
             run in int8 with per-tensor ranges: full int8 costs a ViT much more
             than dynamic range does); top-1 100% trained
    collapsed int8, calibrated on blank or mis-scaled images: cosine -0.34 to 0.46;
             top-1 0 to 62% trained

float16 and dynamic keep their losses at least ten times inside their
thresholds; int8's sits between its worst correct result and its best
collapse, and its top-1 threshold between the two as well.

Top-1 agreement is not judged at random weights (unless `min_top1` is
given): a randomly initialised ViT's top-1 leads its runner-up by a fraction
of the logits' spread, so rounding flips it. A correct dynamic deit_small
agreed on 14 of 16 images, a correct int8 test ViT on 4 of 8. Cosine alone
decides then, and the manifest says so. That is a weak check: deit_small's
outputs at random weights are 0.96 alike from image to image, so an output
that ignored its input would score about that. Judge int8 with the model's
weights and real `validate` images.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from evc.registry import Format, Runtime, register_format
from evc.spec.params import Choice, DataRef, Float, Param, When
from evc.targets._quantized import check_quantized, parity_thresholds, threshold_params
from evc.targets.artifact import Artifact

MODES = ("none", "float16", "dynamic", "int8")
# What int16 parts name to ai-edge-quantizer: (a regex on the op's name, its operation). litert-torch names each
# op after the module that made it, so a LayerNorm's ops (MEAN, SQUARED_DIFFERENCE, RSQRT, ...) carry "LayerNorm".
INT16_PARTS = {"softmax": (".*", "SOFTMAX"), "layernorm": (".*LayerNorm.*", "ALL_SUPPORTED")}
# Per quantized mode: (worst cosine, top-1 agreement); the docstring says why.
THRESHOLDS = {"float16": (0.9999, 0.99), "dynamic": (0.99, 0.9), "int8": (0.6, 0.75)}



@register_format(
    "tflite",
    Param("quantize", Choice(MODES), "none",
          "none (fp32), float16 (fp16 weights), dynamic (int8 weights, dynamic range) "
          "or int8 (full integer, calibrated on `calibrate`)"),
    Param("calibrate", DataRef(), None, "images that set activation ranges for quantize = int8",
          needed_when=(When("quantize", ("int8",)),)),
    Param("tolerance", Float(0, open_low=True), 1e-4,
          "largest max abs diff from PyTorch that passes parity at quantize = none"),
    *threshold_params(THRESHOLDS),
)
class Tflite(Format, Runtime):
    """TFLite, converted with litert-torch, quantized with ai-edge-quantizer, checked in LiteRT."""

    def lower(self, program, target, out_dir: Path, ctx) -> list[Artifact]:
        params = target.params
        mode = params["quantize"]
        model = convert(program)
        if mode != "none":
            model = quantize(model, mode, ctx.images(params["calibrate"]) if mode == "int8" else None)
        path = out_dir / "model.tflite"
        path.write_bytes(model)
        thresholds = parity_thresholds(params, THRESHOLDS, random_weights=ctx.random_weights)
        return [Artifact(Path(path.name), "tflite", details={
            "quantize": mode, "parity_thresholds": thresholds, "io": io_types(path), **describe_ops(path)})]

    def session(self, path: Path, threads: int | None = None):
        """run(x) for one input batch, in the LiteRT interpreter on this machine's CPU."""
        import numpy as np
        from ai_edge_litert.interpreter import Interpreter

        with quiet():
            interpreter = Interpreter(model_path=str(path), num_threads=threads or os.cpu_count())
            interpreter.allocate_tensors()
        (given,), (taken,) = interpreter.get_input_details(), interpreter.get_output_details()

        def run(x):
            interpreter.set_tensor(given["index"], _quantized(np.ascontiguousarray(x, np.float32), given))
            interpreter.invoke()
            return _dequantized(interpreter.get_tensor(taken["index"]), taken)

        return run

    def check_parity(self, parity, params, artifact) -> str | None:
        """None if `parity` passes the thresholds `lower` recorded for the artifact, else why not."""
        return check_quantized(parity, params["quantize"], artifact.details["parity_thresholds"])


def convert(program) -> bytes:
    """The Program as an fp32 TFLite flatbuffer whose signature reads `input` → `logits`."""
    with quiet():
        import litert_torch

        module = _named(program.graph).eval()
        return litert_torch.convert(module, sample_kwargs={"input": program.example()}).model_content()


def quantize(model: bytes, mode: str, calibration=None, int16=()) -> bytes:
    """`model` (fp32 TFLite) rewritten by ai-edge-quantizer: float16, dynamic, or int8 calibrated on images; at
    int8, the `int16` parts (softmax, layernorm) with int16 activations (16x8)."""
    with quiet():
        from ai_edge_quantizer import qtyping, quantizer, recipe
        from ai_edge_quantizer.algorithm_manager import AlgorithmName

        q = quantizer.Quantizer(bytearray(model))
        if mode == "float16":
            q.add_weight_only_config(".*", qtyping.TFLOperationName.ALL_SUPPORTED, 16,
                                     algorithm_key=AlgorithmName.FLOAT_CASTING)
        else:
            q.load_quantization_recipe(recipe.dynamic_wi8_afp32() if mode == "dynamic" else recipe.static_wi8_ai8())
        for part in int16:  # later configs win over the recipe's for the ops they match
            regex, op = INT16_PARTS[part]
            q.add_static_config(regex, getattr(qtyping.TFLOperationName, op), 16, 8)
        ranges = None
        if q.need_calibration:
            ranges = q.calibrate({"serving_default": [{"input": x[None]} for x in calibration]})
        result = q.quantize(ranges, enable_progress_bar=False, enable_progress_report=False)
        return bytes(result.quantized_model)


def describe_ops(path: Path) -> dict:
    """Every op of a .tflite: its count, whether it is a builtin, whether it needs the Flex delegate."""
    from ai_edge_litert import schema_py_generated as schema

    from evc.targets._flatbuffer import operators

    counts = Counter(name for name, _ in operators(path))
    builtins = {name for name in vars(schema.BuiltinOperator) if not name.startswith("_")} - {"CUSTOM"}
    # The converter names a TensorFlow op it keeps as a custom op "Flex<Op>".
    ops = {name: {"count": n, "builtin": name in builtins, "flex": name.startswith("Flex")}
           for name, n in sorted(counts.items())}
    return {"ops": ops, "needs_flex": any(op["flex"] for op in ops.values())}


def io_types(path: Path) -> dict:
    """The input's and output's dtype, with scale and zero point where they are quantized."""
    from ai_edge_litert.interpreter import Interpreter

    with quiet():
        interpreter = Interpreter(model_path=str(path))

    def describe(detail):
        if detail["dtype"].__name__ == "float32":
            return {"dtype": "float32"}
        scale, zero_point = detail["quantization"]
        return {"dtype": detail["dtype"].__name__, "scale": float(scale), "zero_point": int(zero_point)}

    return {"input": describe(interpreter.get_input_details()[0]),
            "output": describe(interpreter.get_output_details()[0])}


def _quantized(x, detail):
    """A float batch as the model takes it: quantized with the input's scale and zero point when int8."""
    import numpy as np

    if detail["dtype"] == np.float32:
        return x
    scale, zero_point = detail["quantization"]
    limits = np.iinfo(detail["dtype"])
    return np.clip(np.round(x / scale + zero_point), limits.min, limits.max).astype(detail["dtype"])


def _dequantized(y, detail):
    import numpy as np

    if detail["dtype"] == np.float32:
        return y.copy()
    scale, zero_point = detail["quantization"]
    return (y.astype(np.float32) - zero_point) * scale


def _named(module):
    """`module` wrapped so the converted signature reads `input` → `logits`, as the ONNX artifact does."""
    import torch

    class Named(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, input):  # noqa: A002 - the name the signature takes
            return {"logits": self.inner(input)}

    return Named()


@contextmanager
def quiet():
    """Silence what the converter, quantizer and interpreter print: C++ logs and progress bars on fds 1
    and 2, and Python warnings (the calibrator's own warning that it keeps every tensor, for one)."""
    import tempfile  # here, as plug-ins stay light to import (evc.registry)

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
