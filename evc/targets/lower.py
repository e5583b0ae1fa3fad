"""The lower stage: compressed Program → artifacts, validated against PyTorch and scored.

    checked = lower(plan, target, compiled, folder, progress)            # into `folder`; the check record
    folder, checked = cached_lower(plan, target, compiled, key, cache, progress)

The target's format writes its artifacts; each is then run in its runtime here
on the target's `validate` images and compared with the Program's outputs
(parity), and, with an `evaluate` block, scored for accuracy. An artifact that
misses parity raises ParityFailure, which carries a copy of the artifacts and
the record for the driver to keep beside the bundle; nothing is cached.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from evc.atomic import refused_write
from evc.cache import Cache
from evc.context import Context
from evc.errors import BuildError, EvcError, first_line
from evc.progress import Progress
from evc.registry import FORMATS, Estimated, Runtime
from evc.spec.plan import DataPlan, Plan, TargetPlan

CHECKED = "lowered.json"  # the validation record, kept with the cached artifacts


class ParityFailure(BuildError):
    """Artifacts that missed parity against PyTorch: `artifacts` is a copy of them (a temporary folder the
    caller keeps or removes), `checked` their check record, `failures` one line per artifact."""

    def __init__(self, target: str, artifacts: Path, checked: dict, failures: list[str]):
        super().__init__(f"target '{target}' failed parity against PyTorch: {'; '.join(failures)}")
        self.artifacts, self.checked, self.failures = artifacts, checked, failures


def cached_lower(plan: Plan, target: TargetPlan, compiled, key: str, cache: Cache, progress: Progress,
                 original=None) -> tuple[Path, dict]:
    """The folder of checked artifacts (in the cache) and the record of their checks, lowered when the cache
    does not hold them; `original` is the Program as loaded (a latency budget times against it)."""
    peers, parts = target.params.get("peers") or (), compiled.program.parts
    if peers and len(peers) != len(parts):
        raise plan.error(target.spans.get("peers"), f"target '{target.name}': peers: {len(peers)} given for "
                                                    f"{len(parts)} parts; list one HOST:PORT per part, in part order"
                                                    + ("" if parts else " (the model is not decomposed)"))
    folder = cache.get("lower", key)
    if folder is None:
        with cache.entry("lower", key) as out:
            lower(plan, target, compiled, out, progress, original)
        folder = cache.path("lower", key)
    return folder, json.loads((folder / CHECKED).read_text())


def validation_data(plan: Plan, target: TargetPlan) -> DataPlan:
    from evc.model.data import DEFAULT_VALIDATION

    name = target.params.get("validate")
    return plan.data[name] if name else DEFAULT_VALIDATION


def lower(plan: Plan, target: TargetPlan, compiled, folder: Path, progress: Progress, original=None) -> dict:
    """Lower `compiled` as `target` says into `folder` and check every artifact; the check record (also kept
    in the folder as CHECKED). Raises ParityFailure when an artifact misses parity."""
    fmt = FORMATS[target.format].plugin
    program = compiled.program
    with progress.stage(f"lower to {target.format} for target '{target.name}'"):
        try:
            ctx = Context(plan, progress, image=program.input)
            if program.parts:
                artifacts = _lower_parts(fmt, program, target, folder, ctx)
            else:
                artifacts = fmt.lower(program, target, folder, ctx)
        except EvcError:
            raise
        except Exception as e:  # the exporter's own message names the op or node at fault
            if refused_write(e, folder):  # the machine's refusal, said where the folder is written (evc.atomic)
                raise
            raise BuildError(f"target '{target.name}': lowering to {target.format} failed: {first_line(e)}") from e
    failures, validation = [], None
    if isinstance(fmt, Runtime):  # a format with no runtime here is checked on the device alone
        validation = _validate(plan, target, compiled, fmt, folder, artifacts, progress, failures)
        if plan.evaluate and not program.parts:
            _score(plan, target, fmt, folder, artifacts, program.input, progress)
    output = compiled.program.run(compiled.program.example())
    checked = {"artifacts": [a.describe(folder) for a in artifacts], "output_shape": list(output.shape),
               "validation": validation}
    budget = compiled.budget
    if budget and budget["metric"] == "latency" and budget["on"] == target.name and not failures:
        path = folder / artifacts[0].path
        if isinstance(fmt, Estimated):
            checked["latency"] = timed = _estimated(fmt, path, program, budget)
            if not timed["met"]:
                progress.warn(f"target '{target.name}': the estimate of the built model, {timed['estimated_ms']:.3f} "
                              f"ms, misses the latency budget of {timed['budget_ms']:.3f} ms (its table predicted "
                              f"{timed['predicted_ms']:.3f} ms)")
        elif target.device == "cpu":  # a phone's model is timed on the phone: evc bench --serial
            checked["latency"] = _timed(plan, target, fmt, path, program, budget, progress, original)
    (folder / CHECKED).write_text(json.dumps(checked, indent=2) + "\n")
    if failures:
        kept = Path(tempfile.mkdtemp(prefix="evc-failed-"))
        shutil.copytree(folder, kept, dirs_exist_ok=True)
        raise ParityFailure(target.name, kept, checked, failures)
    return checked


def _lower_parts(fmt, program, target: TargetPlan, folder: Path, ctx: Context) -> list:
    """A decomposed model: every part lowered by the target's format into its own folder, the fusion
    to ONNX (the coordinator runs it), and collab.json, which `evc serve` and `evc infer` read. A part
    is served from its format's first artifact: the model itself (for the BPU, the float ONNX that the
    toolchain compiles; `evc serve` runs it here in ONNX Runtime)."""
    from evc.runtime.collab import contract

    artifacts, served = [], []
    for part in program.parts:
        (folder / part.name).mkdir()
        lowered = fmt.lower(part.program, target, folder / part.name, ctx)
        for artifact in lowered:
            artifact.path = Path(part.name) / artifact.path
            artifact.details["part"] = part.name
        artifacts += lowered
        served.append((str(lowered[0].path), part.width))
    width = sum(p.width for p in program.parts)
    FORMATS["onnx"].plugin.export_module(program.fusion, (_zeros(1, width), _zeros(1, len(program.parts))),
                                         folder / FUSION, inputs=("tokens", "present"))
    contract.write(folder, program.input, served, FUSION, bool(program.fusion.drop))
    return artifacts


FUSION = "fusion.onnx"


def _zeros(*shape):
    import torch

    return torch.zeros(shape)


def _timed(plan: Plan, target: TargetPlan, fmt: Runtime, path: Path, program, budget: dict, progress: Progress,
           whole) -> dict:
    """The artifact a latency budget was searched for, timed as its table was, taking turns with the model as
    loaded (lowered alike), so that the share of its time is measured in one sitting: predicted against
    measured, in ms and as a share of the loaded model's."""
    import numpy as np

    from evc.ir.latency import Table
    from evc.runtime.timing import interleaved, thread_count

    threads = thread_count(target.params["threads"][0])
    table = Table.from_dict(budget["table"])
    with progress.stage(f"time {path.name} against the latency budget ({threads} thread(s))"), \
            tempfile.TemporaryDirectory() as folder:
        reference = Path(folder) / fmt.lower(whole, target, Path(folder), Context(plan, progress, whole))[0].path
        feed = np.random.default_rng(0).standard_normal(program.input.shape, dtype=np.float32)
        times = interleaved({"model": fmt.session(path, threads), "loaded": fmt.session(reference, threads)}, feed,
                            target.params["runs"], target.params["warmups"])
    predicted = table.predict(program.structure)
    return {"budget_ms": budget["target"], "predicted_ms": predicted, "measured_ms": times["model"],
            "loaded_measured_ms": times["loaded"], "predicted_share": predicted / budget["loaded_ms"],
            "measured_share": times["model"] / times["loaded"], "threads": threads}


def _estimated(fmt: Estimated, path: Path, program, budget: dict) -> dict:
    """The artifact a latency budget was searched for, its latency estimated as its table's was (Vela's): predicted
    against estimated, in ms and as a share of the model as loaded (whose estimate is the table's widest point),
    and whether the estimate meets the budget."""
    from evc.ir.latency import Table

    predicted = Table.from_dict(budget["table"]).predict(program.structure)
    estimated = fmt.estimated_ms(path)
    return {"budget_ms": budget["target"], "predicted_ms": predicted, "estimated_ms": estimated,
            "loaded_estimated_ms": budget["loaded_ms"], "predicted_share": predicted / budget["loaded_ms"],
            "estimated_share": estimated / budget["loaded_ms"], "met": estimated <= budget["target"]}


def _validate(plan: Plan, target: TargetPlan, compiled, fmt: Runtime, folder: Path, artifacts, progress: Progress,
              failures: list[str]) -> dict:
    """Each artifact's parity with the Program on the target's validation data; appends to `failures` the
    artifacts that miss it. A decomposed model's parts are each checked against their own Program, and
    the whole, fused from the lowered parts, against the PyTorch ensemble."""
    from evc.model.data import load_images
    from evc.runtime.parity import compare

    data = validation_data(plan, target)
    program = compiled.program
    with progress.stage(f"validate target '{target.name}' on {data.name}"):
        images = load_images(data, program.input)
        references = {p.name: p.program.run(images).numpy() for p in program.parts}
        reference = program.run(images).numpy()
        for artifact in artifacts:
            parity = compare(references.get(artifact.details.get("part"), reference),
                             fmt.run(folder / artifact.path, images))
            artifact.parity = parity.to_dict()
            reason = fmt.check_parity(parity, target.params, artifact)
            if reason:
                failures.append(f"{artifact.path}: {reason}")
        record = {"data": data.name, "samples": len(images)}
        if program.parts:
            from evc.runtime.collab.runtime import local_infer

            whole = compare(reference, local_infer(folder, images))
            record["whole"] = whole.to_dict()
            reason = fmt.check_parity(whole, target.params, artifacts[0])  # the parts' thresholds
            if reason:
                failures.append(f"the parts fused ({FUSION} on the lowered parts): {reason}")
    return record


def _score(plan: Plan, target: TargetPlan, fmt: Runtime, folder: Path, artifacts, image,
           progress: Progress) -> None:
    """Each artifact's top-k on the evaluate block's data, run in its own runtime here."""
    from evc.runtime.evaluate import accuracy, labelled

    with progress.stage(f"evaluate target '{target.name}' on {plan.evaluate.data}"):
        images, labels = labelled(plan, image)
        for artifact in artifacts:
            artifact.accuracy = accuracy(fmt.run(folder / artifact.path, images), labels, plan.evaluate.top)
