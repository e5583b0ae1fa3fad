"""Vela, Arm's compiler for the Ethos-U NPUs, called through its own Python API (ethos-u-vela 5.x).

    estimate = compile_tflite(Path("model.tflite"), "u85_256", out_dir=Path("bundle"))
    estimate["inference_ms"], estimate["ops"]        # Vela's estimate; operators on the NPU and the CPU
    facts = vela_facts()                             # devices/ethos_u.json, as Vela 5.x states it

Vela places each operator of a full-integer TFLite model on the NPU or leaves
it to the CPU, and estimates cycles and memory for a system configuration
(clocks, memory ports) and memory mode of its vela.ini. What it computes comes
from its own objects: the perf report (cycles, peak usage per memory), its
operator database (the `source` table keys each operator by its index in the
input model) and the summary CSV it writes. Why an operator stays on the CPU it
says only as a warning printed by its C++ core, one per operator
(`Warning (supported operators) operator: OP, ofm: 'TENSOR'` then `Reason:`
lines); those are read back and attached to the operator by its output tensor.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import tempfile
from pathlib import Path

FACTS_PATH = Path(__file__).parent / "devices" / "ethos_u.json"  # vela_facts(), as the installed Vela last said
FACTS = json.loads(FACTS_PATH.read_text())
VELA_INI = ("Arm", "vela.ini")
DEFAULT = "internal-default"  # Vela's ArchitectureFeatures.DEFAULT_CONFIG: its own default for the NPU
CUSTOM_OP = "ethos-u"  # the custom operator Vela writes for each part it runs on the NPU
_WARNING = re.compile(r"^Warning \(supported operators\) operator: (\S+), ofm: '(.*)'$")


def accelerator(npu: str) -> str:
    """Vela's name for a spec's `npu`: u85_256 → ethos-u85-256."""
    return "ethos-" + npu.replace("_", "-")


def ini_path() -> Path:
    from ethosu.vela import architecture_features

    return Path(architecture_features.CONFIG_FILES_PATH).joinpath(*VELA_INI)


def architecture(npu: str, system: str | None = None, memory_mode: str | None = None):
    """Vela's ArchitectureFeatures for `npu` in `system` and `memory_mode` (None: Vela's default for the NPU);
    Vela's own ConfigOptionError when the memory mode does not fit the system."""
    from ethosu.vela.architecture_features import ArchitectureFeatures

    default = system is None and memory_mode is None
    if not default and None in (system, memory_mode):  # Vela takes both from its file, or both its defaults
        own = architecture(npu)
        system, memory_mode = system or own.system_config, memory_mode or own.memory_mode
    with _captured():  # Vela prints a warning naming each default it takes
        return ArchitectureFeatures(vela_config_files=None if default else [str(ini_path())],
                                    system_config=system or DEFAULT, memory_mode=memory_mode or DEFAULT,
                                    accelerator_config=accelerator(npu), max_blockdep=3, verbose_config=False,
                                    arena_cache_size=None)


def vela_facts() -> dict:
    """What devices/ethos_u.json holds, read from the installed Vela: its accelerator configurations (MACs per
    cycle), the system configurations and memory modes of its vela.ini (clock; which memory modes Vela accepts
    on each), and its default system and memory mode per NPU."""
    from configparser import ConfigParser

    from ethosu.vela import __version__
    from ethosu.vela.architecture_features import Accelerator
    from ethosu.vela.errors import VelaError

    ini = ConfigParser()
    ini.read(ini_path())
    systems = [s.split(".", 1)[1] for s in ini.sections() if s.startswith("System_Config.")]
    modes = [s.split(".", 1)[1] for s in ini.sections() if s.startswith("Memory_Mode.")]
    npus = {}
    for value in Accelerator.member_list():
        npu = value.removeprefix("ethos-").replace("-", "_")
        arch = architecture(npu)
        npus[npu] = {"vela": value, "family": npu.split("_")[0], "macs_per_cycle": arch.num_macs_per_cycle,
                     "cores": arch.ncores,
                     "default_system": arch.system_config, "default_memory_mode": arch.memory_mode}
    table = {}
    for system in systems:
        accepted = []
        for mode in modes:
            try:
                architecture("u55_128", system, mode)
                accepted.append(mode)
            except VelaError:
                pass
        table[system] = {"core_clock_hz": float(ini[f"System_Config.{system}"]["core_clock"]),
                         "memory_modes": accepted}
    return {"vela": __version__, "source": "ethos-u-vela: ethosu.vela.architecture_features.Accelerator and "
                                          "config_files/Arm/vela.ini, by evc.targets._vela.vela_facts",
            "npus": npus, "systems": table, "memory_modes": modes}


def compile_tflite(tflite: Path, npu: str, system: str | None = None, memory_mode: str | None = None,
                   out_dir: Path | None = None) -> dict:
    """Compile the full-integer `tflite` for `npu` with Vela: its estimate and operator placement. With `out_dir`,
    Vela's model (`model_vela.tflite`), its per-layer report (`vela_per_layer.csv`) and its summary
    (`vela_summary.csv`) are written there."""
    from ethosu import regor
    from ethosu.vela import stats_writer

    arch = architecture(npu, system, memory_mode)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir or tmp)
        with _captured() as printed:
            compiled = regor.compile(_regor_name(npu), tflite.read_bytes(), "TFLITE", _system_text(arch),
                                     options=_options(arch), verbose=False)
            report, database = compiled.perf_report, compiled.opt_database
            stats_writer.write_regor_perlayer_performance_csv(arch, database, report, str(folder / "vela"))
            stats_writer.print_regor_performance_metrics(arch, report, tflite.stem, str(folder / "vela_summary.csv"),
                                                         database)
        (folder / "vela_per-layer.csv").replace(folder / "vela_per_layer.csv")
        (folder / "model_vela.tflite").write_bytes(compiled.model)
        with (folder / "vela_summary.csv").open() as f:
            summary = next(csv.DictReader(f))
        placement = _placement(tflite, folder / "model_vela.tflite", _reasons(printed.text()))
    seconds = float(summary["inference_time"])
    return {
        "npu": npu, "accelerator": arch.accelerator_config.value, "system": arch.system_config,
        "memory_mode": arch.memory_mode, "core_clock_hz": arch.core_clock,
        "cycles": {"total": int(report.totalCycles), "npu": int(report.npuCycles)},
        "inference_ms": 1000 * seconds, "macs": int(report.macCount),
        "memory": {m.memoryName: int(m.peakUsage) for m in report.memories.values()
                   if str(m.memoryName).lower() not in ("shram", "lutram")},
        "weights": {"original": int(report.originalWeights), "encoded": int(report.encodedWeights)},
        "vela": _version(), **placement}


def _placement(source: Path, compiled: Path, reasons: dict) -> dict:
    """Operators by place: every operator of the input model that Vela's output keeps as itself runs on the CPU
    (with Vela's reasons); the rest Vela took into its NPU custom operators."""
    from evc.targets._flatbuffer import operators

    before, after = operators(source), operators(compiled)
    on_cpu = {(op, out) for op, out in after if op != CUSTOM_OP}
    cpu = [{"op": op, "output": out, "reasons": reasons.get(out, [])} for op, out in before if (op, out) in on_cpu]
    by_op: dict[str, dict[str, int]] = {}
    for op, out in before:
        place = "cpu" if (op, out) in on_cpu else "npu"
        by_op.setdefault(op, {"npu": 0, "cpu": 0})[place] += 1
    return {"ops": {"npu": len(before) - len(cpu), "cpu": len(cpu)}, "by_op": dict(sorted(by_op.items())),
            "cpu_ops": cpu, "npu_parts": sum(op == CUSTOM_OP for op, _ in after)}


def _reasons(text: str) -> dict[str, list[str]]:
    """Vela's reasons by output tensor: each warning's `Reason:` line and the lines that explain it."""
    reasons: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        match = _WARNING.match(line.strip())
        if match:
            current = reasons.setdefault(match.group(2), [])
        elif current is not None and line.strip() and not line.startswith(("Warning", "TfLiteReader")):
            current.append(line.strip().removeprefix("Reason: "))
        else:
            current = None
    return reasons


def _regor_name(npu: str) -> str:
    """Vela's core names an NPU by its family: u85_256 → EthosU85 (the MACs go in the system text)."""
    return "Ethos" + npu.split("_")[0].upper()


def _system_text(arch) -> str:
    """The system configuration Vela's core reads, made as vela.py makes it."""
    text = (f"[architecture]\nmacs={arch.num_macs_per_cycle}\ncores={arch.ncores}\n[vela]\n"
            f"system_config_name={arch.system_config}\nmemory_mode_name={arch.memory_mode}\n")
    return text + "".join(Path(f).read_text() for f in arch.vela_config_files)


def _options(arch) -> str:
    """Vela's compiler options as its command line sets them by default, with its operator database kept."""
    from ethosu.vela.nn_graph import TensorAllocator
    from ethosu.vela.scheduler import OptimizationStrategy
    from ethosu.vela.vela import get_compiler_config

    return get_compiler_config(
        enable_debug_db=False, verbose_all=False, verbose_high_level_command_stream=False,
        verbose_register_command_stream=False, optimize=OptimizationStrategy.Performance,
        arena_cache_size=arch.arena_cache_size, verbose_schedule=False, verbose_allocation=False,
        verbose_graph=False, verbose_quantization=False, verbose_packing=False, verbose_performance=True,
        show_cpu_operations=True, output_format="tflite", disable_chaining=False, disable_fwd=False,
        disable_cascading=False, disable_buffering=False, disable_ifm_reuse=False, cop_format="COP1",
        separate_io_regions=False, cpu_tensor_alignment=16, tensor_allocator=TensorAllocator.HillClimb,
        softmax_int16_neg_exp_range=10.0)


def _version() -> str:
    from ethosu.vela import __version__

    return __version__


class _captured:
    """What Vela prints on file descriptors 1 and 2 (its C++ core writes there directly), kept, not shown."""

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self._sink = tempfile.TemporaryFile(mode="w+b")
        self._saved = [os.dup(1), os.dup(2)]
        os.dup2(self._sink.fileno(), 1)
        os.dup2(self._sink.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in zip((1, 2), self._saved):
            os.dup2(saved, fd)
            os.close(saved)
        self._sink.seek(0)
        self._text = self._sink.read().decode(errors="replace")
        self._sink.close()
        return False

    def text(self) -> str:
        return self._text


if __name__ == "__main__":  # write devices/ethos_u.json again from the installed Vela
    from evc.atomic import write_text

    write_text(FACTS_PATH, json.dumps(vela_facts(), indent=1) + "\n")
