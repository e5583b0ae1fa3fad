"""format = vela: a full-integer TFLite model compiled by Arm's Vela for an Ethos-U NPU, checked in LiteRT.

    target mcu { device = ethos_u, format = vela, npu = u85_256, calibrate = calib }
    target mcu { device = ethos_u, format = vela, npu = u55_128, system = Ethos_U55_Deep_Embedded,
                 memory_mode = Shared_Sram, calibrate = calib, int16 = [softmax, layernorm] }

The Program is rewritten for the NPU (_ethos_native.py: a copy, never the
user's model), converted by litert-torch and quantized to full integer by
ai-edge-quantizer (int8 weights and activations, int8 input and output; the
`int16` parts with int16 activations, 16x8), which is `model.tflite`: its
parity against PyTorch is judged in LiteRT, before Vela, as the tflite format
judges int8. Vela then compiles it for `npu` in `system` and `memory_mode` (the
names of Vela's vela.ini; by default Vela's own for the NPU) and writes:

    model_vela.tflite     the model for the device: the NPU's parts as ethos-u custom operators,
                          any operator Vela left to the CPU as itself
    vela_per_layer.csv    Vela's per-layer estimate: cycles, MACs, memory accesses per operator
    vela_summary.csv      Vela's summary: cycles, inference time at the system's clock, bandwidth, memory
    ethos_u.json          evc's summary: the estimate, operators on the NPU and the CPU (each
                          CPU operator with Vela's reasons), and the rewrites

Vela's estimate (`inference_ms`: cycles at the system's clock) is the
target's latency: in the manifest, `evc diff`, the report, and the latency
table `evc profile` builds, so a latency budget can be written for an NPU.
"""

from __future__ import annotations

import json
from pathlib import Path

from evc.errors import BuildError
from evc.registry import Estimated, Format, Placement, Runtime, register_format
from evc.spec.params import Choice, DataRef, Invalid, ListOf, Param
from evc.targets._quantized import check_quantized, parity_thresholds, threshold_params
from evc.targets._vela import FACTS
from evc.targets.artifact import Artifact

MODEL, COMPILED, SUMMARY = "model.tflite", "model_vela.tflite", "ethos_u.json"
# The same quantizer as the tflite format's int8, so the same thresholds (evc/targets/tflite.py says where
# they come from); int16 parts measured on the reduced DeiT-Tiny: 0.91 (softmax), 0.88 (softmax, layernorm).
THRESHOLDS = {"int8": (0.6, 0.75)}
PARTS = ("softmax", "layernorm")


def _check(values: dict, spans: dict, device: str) -> None:
    """A memory mode Vela refuses for the system (the one given, or the NPU's default) is a spec error."""
    npu = FACTS["npus"][values["npu"]]
    system = values["system"] or npu["default_system"]
    mode = values["memory_mode"] or npu["default_memory_mode"]
    accepted = FACTS["systems"][system]["memory_modes"]
    if mode not in accepted:
        where = "memory_mode" if values["memory_mode"] else "system"
        raise Invalid(f"{where}: Vela refuses memory mode {mode} on system {system}"
                      + ("" if values["memory_mode"] else f" ({values['npu']}'s default memory mode)"),
                      spans.get(where), f"its memory modes: {', '.join(accepted)}")


@register_format(
    "vela",
    Param("npu", Choice(tuple(FACTS["npus"])), help="the Ethos-U and its MACs per cycle, as Vela names them "
                                                   "(u55_128 is Vela's ethos-u55-128)"),
    Param("system", Choice(tuple(FACTS["systems"])), None,
          "Vela's system configuration (vela.ini): clocks and memory ports; default: Vela's for the NPU"),
    Param("memory_mode", Choice(tuple(FACTS["memory_modes"])), None,
          "Vela's memory mode (vela.ini): where weights and tensors live; default: Vela's for the NPU"),
    Param("quantize", Choice(("int8",)), "int8", "full integer: int8 weights and activations (the `int16` parts' "
                                                 "activations in int16)"),
    Param("calibrate", DataRef(), help="images that set activation ranges"),
    Param("int16", ListOf(Choice(PARTS), or_single=True), (),
          "parts whose activations are int16 (16x8): softmax (every SOFTMAX), layernorm (each LayerNorm's ops)"),
    *threshold_params(THRESHOLDS),
    check=_check,
)
class Vela(Format, Runtime, Estimated, Placement):
    """Full-integer TFLite compiled by Vela for an Arm Ethos-U NPU, with Vela's estimate; parity in LiteRT."""

    def lower(self, program, target, out_dir: Path, ctx) -> list[Artifact]:
        from evc.targets.tflite import describe_ops, io_types

        params = target.params
        path, record = compiled(program, params, ctx.images(params["calibrate"]), out_dir)
        if record["ops"]["npu"] == 0:
            raise BuildError(f"target '{target.name}': Vela placed no operator on the {params['npu']} NPU")
        thresholds = parity_thresholds(params, THRESHOLDS, random_weights=ctx.random_weights)
        return [Artifact(Path(MODEL), "tflite", details={
            "quantize": "int8", "int16": list(params["int16"]), "parity_thresholds": thresholds,
            "io": io_types(path), **describe_ops(path), "ethos_u": _manifest_record(record),
            "placement": placement_of(record)})]

    def placement(self, program, target) -> dict:
        """Vela's placement of `program` for `target`, writing no bundle: calibrated on random images, as where
        an operator runs does not depend on its ranges."""
        import tempfile  # here, as plug-ins stay light to import (evc.registry)

        import numpy as np

        images = np.random.default_rng(0).standard_normal((4, *program.input.shape[1:]), dtype=np.float32)
        with tempfile.TemporaryDirectory() as tmp:
            return placement_of(compiled(program, target.params, images, Path(tmp))[1])

    def session(self, path: Path, threads: int | None = None):
        """run(x) for one input batch of the int8 model, in the LiteRT interpreter on this machine's CPU."""
        from evc.registry import FORMATS

        return FORMATS["tflite"].plugin.session(path, threads)

    def check_parity(self, parity, params, artifact) -> str | None:
        return check_quantized(parity, "int8", artifact.details["parity_thresholds"])

    def estimated_ms(self, artifact: Path) -> float:
        """Vela's estimate of one inference, as `lower` recorded it beside the artifact."""
        return json.loads((artifact.parent / SUMMARY).read_text())["inference_ms"]


def compiled(program, params: dict, images, out_dir: Path) -> tuple[Path, dict]:
    """`program` rewritten for the NPU, converted, quantized (calibrated on `images`) into out_dir/model.tflite and
    compiled by Vela as `params` say; (that path, the record ethos_u.json keeps)."""
    from evc.targets._ethos_native import for_the_npu
    from evc.targets._vela import compile_tflite
    from evc.targets.tflite import convert, quantize

    lowered, rewrites = for_the_npu(program, params["npu"])
    path = out_dir / MODEL
    path.write_bytes(quantize(convert(lowered), "int8", images, int16=params["int16"]))
    estimate = compile_tflite(path, params["npu"], params["system"], params["memory_mode"], out_dir)
    record = {**estimate, "rewrites": rewrites, "files": {"model": COMPILED, "per_layer": "vela_per_layer.csv",
                                                          "summary": "vela_summary.csv"}}
    (out_dir / SUMMARY).write_text(json.dumps(record, indent=1) + "\n")
    return path, record


def placement_of(record: dict) -> dict:
    """Vela's placement as `evc explain` shows an operator check: counts by place, each CPU operator and why."""
    return {"march": f"{record['accelerator']}, {record['system']}, {record['memory_mode']}",
            "summary": dict(record["ops"]), "unsupported": [],
            "cpu": [{"node": op["output"], "op": op["op"], "on": "cpu", "why": "; ".join(op["reasons"])}
                    for op in record["cpu_ops"]]}


def _manifest_record(record: dict) -> dict:
    """What the manifest keeps of ethos_u.json: all but the per-operator counts, which stay in the file."""
    return {key: value for key, value in record.items() if key != "by_op"} | {"summary": SUMMARY}


def estimate(tflite: Path, npu: str, system: str | None = None, memory_mode: str | None = None,
             out_dir: Path | None = None) -> dict:
    """Vela's estimate and operator placement for a full-integer .tflite on `npu` (a name of devices/ethos_u.json:
    u55_128, u65_256, u85_256, ...): inference_ms, cycles, memory, ops {npu, cpu}, by_op, cpu_ops with reasons."""
    from evc.targets._vela import compile_tflite

    if npu not in FACTS["npus"]:
        raise ValueError(f"unknown npu '{npu}' (known: {', '.join(FACTS['npus'])})")
    return compile_tflite(Path(tflite), npu, system, memory_mode, out_dir)

