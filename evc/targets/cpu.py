"""device = cpu: a plain CPU running ONNX Runtime, LiteRT or ExecuTorch, benchmarked by a generated Python script.

    target cpu { device = cpu, format = onnx }
    target cpu { device = cpu, format = onnx, quantize = int8, calibrate = calib }   # ONNX Runtime's int8
    target cpu { device = cpu, format = tflite, quantize = dynamic }   # bench.py times it in LiteRT
    target cpu { device = cpu, format = pte, quantize = int8, calibrate = calib }   # ... in ExecuTorch, XNNPACK
"""

from evc.registry import Device, register_device
from evc.spec.params import AnyOf, Choice, Int, ListOf, Param, Text


@register_device(
    "cpu",
    Param("threads", ListOf(AnyOf((Int(1, 1024), Choice(("all",)))), or_single=True), (1, "all"),
          "thread counts to benchmark at; `all` is every core of the machine"),
    Param("runs", Int(1), 50, "timed runs per thread count"),
    Param("warmups", Int(0), 10, "untimed runs before timing"),
    Param("peers", ListOf(Text(pattern=r"[A-Za-z0-9._-]+:[0-9]{1,5}", shape='"HOST:PORT"')), (),
          "where a decomposed model's parts are served, one per part in part order: collab.json's placement "
          "and evc infer's default --peers"),
    formats=("onnx", "tflite", "pte"),
    templates="cpu",
)
class Cpu(Device):
    """a plain CPU with ONNX Runtime (onnx), the LiteRT interpreter (tflite) or ExecuTorch with XNNPACK (pte)"""
