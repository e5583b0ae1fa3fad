"""device = jetson: an NVIDIA Jetson running TensorRT on the bundle's ONNX.

    target orin { device = jetson, format = onnx, precision = fp16 }

TensorRT builds its engine on the board itself, so evc ships the checked
ONNX and a `bench.sh` that runs `trtexec` at the target's precision while
tegrastats logs power, then `parse_trtexec.py` turns both logs into
latency, throughput and energy per inference.
"""

from pathlib import Path

from evc.errors import InputError
from evc.registry import BoardTimed, Device, register_device
from evc.spec.params import Choice, Int, Param


@register_device(
    "jetson",
    Param("precision", Choice(("fp32", "fp16", "int8")), "fp16",
          "TensorRT precision; int8 without a calibration cache times kernels, its accuracy is not checked"),
    Param("iterations", Int(1), 200, "timed inferences trtexec runs at least"),
    Param("warm_up_ms", Int(0), 500, "trtexec warm-up before timing, in ms"),
    Param("tegrastats_interval", Int(10, 10000), 100, "tegrastats sampling interval, in ms"),
    formats=("onnx",),
    templates="jetson",
    files=("parse_trtexec.py",),
)
class Jetson(Device, BoardTimed):
    """an NVIDIA Jetson with TensorRT"""

    def latency_ms(self, bundle: Path, threads: int) -> float:
        """trtexec's median latency (enqueue to output, on the board) from the log bench.sh keeps."""
        from evc.targets.payload.parse_trtexec import parse_trtexec

        log = bundle / "results" / "trtexec.log"
        try:
            return parse_trtexec(log.read_text(errors="replace"))["latency_ms"]["median"]
        except FileNotFoundError:
            raise InputError(f"{log}: no trtexec log: run bench.sh in {bundle.name} on the Jetson") from None
        except (ValueError, KeyError) as e:
            raise InputError(f"{log}: {e}") from None
