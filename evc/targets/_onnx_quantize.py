"""ONNX Runtime's quantization tools on an exported ONNX model: int8 static (QDQ) and dynamic.

    quantize(Path("model.onnx"), Path("model_int8.onnx"), "int8", images)     # calibrated on images
    quantize(Path("model.onnx"), Path("model_dynamic.onnx"), "dynamic")
    int8_report(Path("model_int8.onnx"))   # the int8 ops and how many weights are stored in 8 bits

The recipe, for a ViT on any x86 CPU:
- MatMul, Gemm and Conv are quantized, nothing else: LayerNorm, GELU and the
  residual Adds stay float (quantizing them all cost the test ViT cosine
  0.997 → 0.93, deit_small 0.997 → 0.85), while the matrix products hold
  nearly all the time. Softmax, between two quantized products, ONNX
  Runtime runs as QLinearSoftmax.
- Weights int8, per output channel, symmetric; activations uint8, per
  tensor, MinMax ranges over the calibration images (static), or each
  batch's own range (dynamic: DynamicQuantizeLinear, MatMulInteger).
- Weights use 7 of their 8 bits (`reduce_range`). x86 CPUs without VNNI
  multiply uint8 by int8 with VPMADDUBSW, which sums pairs of products in 16
  bits and saturates beyond 32767: 2 × 255 × 64 cannot reach it, 2 × 255 ×
  127 can. So AVX2, AVX-512 and VNNI hosts compute the same integer sums,
  the outputs differ between them only by float rounding, and parity
  measured here holds on all of them.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import onnx
from onnx import TensorProto
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from evc.targets._quantized import quiet

QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
INT8_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
            "QLinearMatMul", "QLinearConv")
RECIPE = {
    "int8": "onnxruntime quantize_static, QDQ; MatMul/Gemm/Conv only; weights int8 per channel, symmetric, "
            "7 bits (reduce_range: no 16-bit saturation on AVX2 without VNNI); activations uint8 per tensor, "
            "MinMax ranges on the calibrate images",
    "dynamic": "onnxruntime quantize_dynamic; MatMul/Gemm/Conv only; weights int8 per channel, 7 bits "
               "(reduce_range); activations uint8, each input's own range at run time",
}


def quantize(fp32: Path, out: Path, mode: str, images=None) -> None:
    """`fp32` quantized by ONNX Runtime into `out`: mode int8 (static, calibrated on `images`, N×C×H×W) or
    dynamic."""
    with tempfile.TemporaryDirectory() as tmp, quiet():
        # Shape inference lets the quantizer see every MatMul's operands; constant folding and ONNX
        # Runtime's basic fusions leave fewer nodes to quantize around.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        common = {"per_channel": True, "reduce_range": True, "weight_type": QuantType.QInt8,
                  "op_types_to_quantize": list(QUANTIZED_OPS)}
        if mode == "int8":
            quantize_static(str(prepared), str(out), CalibrationImages(images), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax, **common)
        elif mode == "dynamic":
            quantize_dynamic(str(prepared), str(out), **common)
        else:
            raise ValueError(f"quantize = {mode}: ONNX Runtime quantizes int8 or dynamic")


class CalibrationImages(CalibrationDataReader):
    """Preprocessed images (N×C×H×W) fed to the calibrator one at a time, as a device sees them."""

    def __init__(self, images, name: str = "input"):
        self.images, self.name = images, name
        self.rewind()

    def get_next(self):
        x = next(self.batches, None)
        return None if x is None else {self.name: x[None]}

    def rewind(self):
        self.batches = iter(self.images)


def int8_report(path: Path) -> dict:
    """The quantized model's int8 ops by count, and how many weight values are stored in 8 bits and in float."""
    model = onnx.load(str(path))
    ops = Counter(node.op_type for node in model.graph.node if node.op_type in INT8_OPS)
    stored = Counter()
    for tensor in model.graph.initializer:
        count = 1
        for d in tensor.dims:
            count *= d
        if tensor.data_type in (TensorProto.INT8, TensorProto.UINT8):
            stored["int8"] += count
        elif tensor.data_type == TensorProto.FLOAT:
            stored["float"] += count
    return {"int8_ops": dict(sorted(ops.items())),
            "weights_stored": {"int8": stored["int8"], "float": stored["float"]}}
