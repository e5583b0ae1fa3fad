"""device = ethos_u: an Arm Ethos-U NPU (U55, U65, U85) beside a Cortex-M or Cortex-A CPU, its models compiled by Vela.

    target mcu { device = ethos_u, format = vela, npu = u85_256, calibrate = calib }

Its facts are Vela's: the accelerator configurations, the system
configurations and memory modes of vela.ini and Vela's defaults, kept as data
in devices/ethos_u.json (written from the installed Vela by
`python -m evc.targets._vela`; a test checks it against Vela). The `vela`
format reads them to check a spec and compiles with Vela's own API.
No board is reached from here: the latency is Vela's estimate.
"""

from evc.registry import Device, register_device
from evc.targets._vela import FACTS


@register_device(
    "ethos_u",
    formats=("vela",),
    templates="ethos_u",
    facts=FACTS,
)
class EthosU(Device):
    """an Arm Ethos-U NPU, its latency and memory estimated by Vela"""
