"""The int8 proxy: model.onnx quantized here as config.yaml tells hb_mapper to quantize it on the PC.

    quantize_proxy(model_path, proxy_path, images, yaml.safe_load(config_text), bpu_ops={"Gemm", ...},
                   renamed=facts["node_info"]["renamed"])

What the yaml says, the proxy does:
- `calibration_parameters.calibration_type` (and `max_percentile`) choose the calibration of the
  activations, per tensor, from the same images;
- weights are int8, symmetric, per output channel;
- every tensor into or out of a node the op check placed on the BPU is quantized (hb_mapper runs
  every BPU node in int8, the LayerNorm and GELU pieces too), in int8, except
- the inputs and outputs of each node `model_parameters.node_info` names with `InputType` (or
  `InputType<i>` for input i) and `OutputType` int16, which are int16; a name hb_mapper gives a node
  it rewrites (`<Div>_mul`) is that node, with the inputs the two share (_node_info.py);
- the model's output is left as its last node computes it (the toolchain's last Conv outputs int32).

`proxy_plan` says which tensor gets which width, so a test can hold the written proxy against it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from evc.errors import BuildError
from evc.targets._node_info import int16_inputs_outputs
from evc.targets._quantized import quiet

# Per-channel QuantizeLinear needs opset 13; the proxy runs only here, so it may.
PROXY_OPSET = 13
# hb_mapper's calibration_type -> ONNX Runtime's CalibrationMethod. `default` and `mix` search per
# model or per node among these, by the output's cosine; `load` and `skip` do not calibrate.
CALIBRATION = {"max": "MinMax", "kl": "Entropy"}


def proxy_plan(model, config: dict, bpu_ops: set[str], renamed: dict | None = None) -> dict:
    """{"calibrate": (method name, extra options), "int16": tensor names,
    "op_types": op types quantized}, read from `config` (config.yaml as written) and `model` (model.onnx);
    `renamed` is the device's node_info["renamed"], how hb_mapper names the nodes it rewrites."""
    calibration = config["calibration_parameters"]
    kind = calibration.get("calibration_type", "default")
    if kind not in CALIBRATION:
        raise BuildError(f"config.yaml: calibration_type '{kind}' has no int8 proxy here; "
                         f"the proxy calibrates as {', '.join(CALIBRATION)}")
    method, options = CALIBRATION[kind], {}
    percentile = calibration.get("max_percentile", 1.0)
    if kind == "max" and percentile < 1:
        method, options = "Percentile", {"CalibPercentile": 100 * percentile}
    node_info = config["model_parameters"].get("node_info") or {}
    int16 = int16_inputs_outputs(model, node_info, renamed or {})
    if calibration.get("per_channel"):
        raise BuildError("config.yaml: per_channel calibration of activations has no int8 proxy here")
    return {"calibrate": (method, options), "int16": int16, "op_types": sorted(bpu_ops)}


def quantize_proxy(model_path: Path, out_path: Path, images, config: dict, bpu_ops: set[str],
                   renamed: dict | None = None) -> dict:
    """`model_path` quantized to QDQ as `config` says, calibrated on `images`; returns the plan it followed."""
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Images(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(images)

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {"input": x[None]}

    model = version_converter.convert_version(onnx.load(str(model_path)), PROXY_OPSET)
    plan = proxy_plan(model, config, bpu_ops, renamed)
    method, options = plan["calibrate"]
    overrides = {name: [{"quant_type": QuantType.QInt16}] for name in plan["int16"]}
    with tempfile.TemporaryDirectory() as tmp, quiet():
        upgraded = Path(tmp) / "opset13.onnx"
        onnx.save(model, str(upgraded))
        quantize_static(str(upgraded), str(out_path), Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=plan["op_types"], calibrate_method=getattr(CalibrationMethod, method),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "TensorQuantOverrides": overrides, "UseQDQContribOps": True,
                                       **options})
    proxy = onnx.load(str(out_path))
    _output_unquantized(proxy)
    onnx.save(proxy, str(out_path))
    return plan


def _output_unquantized(model) -> None:
    """The model's output as its last node computes it: hb_mapper's last Conv (the classifier's Gemm) gives
    int32 accumulators, dequantized on the CPU, not an int8 requantization of the logits."""
    for output in model.graph.output:
        dequantize = next((n for n in model.graph.node if output.name in n.output), None)
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            continue
        quantize = next((n for n in model.graph.node if dequantize.input[0] in n.output), None)
        if quantize is None or quantize.op_type != "QuantizeLinear":
            continue
        computed = quantize.input[0]
        for node in model.graph.node:
            node.output[:] = [output.name if name == computed else name for name in node.output]
            node.input[:] = [output.name if name == computed else name for name in node.input]
        model.graph.node.remove(quantize)
        model.graph.node.remove(dequantize)
        used = {name for node in model.graph.node for name in node.input}
        for init in [i for i in model.graph.initializer if i.name in quantize.input[1:] and i.name not in used]:
            model.graph.initializer.remove(init)
