"""device = rdk_x5: the D-Robotics RDK X5, whose Bayes-e BPU runs models that Horizon's toolchain compiled.

Its facts are the BPU's operator support, kept as data in devices/rdk_x5.json
and read by the `bpu` format's operator check.
"""

import json
from pathlib import Path

from evc.errors import InputError
from evc.registry import BoardTimed, Device, register_device
from evc.spec.params import Int, ListOf, Param


@register_device(
    "rdk_x5",
    Param("threads", ListOf(Int(1, 64), or_single=True), (1, 4),
          "thread counts for `hrt_model_exec perf` on the board (its thread_num)"),
    Param("frame_count", Int(1), 200, "frames `hrt_model_exec perf` runs per thread count"),
    formats=("bpu",),
    templates="rdk_x5",
    facts=json.loads((Path(__file__).parent / "devices" / "rdk_x5.json").read_text()),
    files=("parse_hrt.py",),
)
class RdkX5(Device, BoardTimed):
    """D-Robotics RDK X5: Horizon Bayes-e BPU, int8, compiled by hb_mapper on a PC"""

    steps = (("pc", "build.sh"), ("board", "bench.sh"))

    def latency_ms(self, bundle: Path, threads: int) -> float:
        """hrt_model_exec perf's average latency at `threads` from the log bench.sh keeps."""
        from evc.targets.payload.parse_hrt import parse_perf

        log = bundle / f"perf_threads_{threads}.log"
        try:
            return parse_perf(log.read_text(errors="replace"))["latency_ms"]
        except FileNotFoundError:
            raise InputError(f"{log}: no hrt_model_exec log: run build.sh in {bundle.name} on the PC, then "
                             "bench.sh on the board") from None
        except ValueError as e:
            raise InputError(f"{log}: {e}") from None
