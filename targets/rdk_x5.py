"""device = rdk_x5: the D-Robotics RDK X5, whose Bayes-e BPU runs models that Horizon's toolchain compiled.

Its facts are the BPU's operator support, kept as data in devices/rdk_x5.json
and read by the `bpu` format's operator check.
"""

import json
from pathlib import Path

from evc.params import Int, ListOf, Param
from evc.registry import Device, register_device


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
class RdkX5(Device):
    """D-Robotics RDK X5: Horizon Bayes-e BPU, int8, compiled by hb_mapper on a PC"""
