"""The build driver: load → passes → lower → validate → scripts, one bundle per target.

    results = build(plan, out=Path("build"))

A target whose bundle already carries the key of everything it depends on
is left alone without loading torch, so an unchanged spec rebuilds in well
under a second and changing one target re-runs only that target.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import evc
from evc.atomic import recover, replace_dir, temp_dir
from evc.bundle import MANIFEST, read_manifest, staged, write_json
from evc.cache import Cache, canonical, library_versions, stage_key
from evc.compile import Compiled, compile_model, load_key, loaded, passes_key, weights_digest
from evc.data import DEFAULT_VALIDATION, data_identity
from evc.errors import BuildError, EvcError
from evc.params import data_refs
from evc.plan import DataPlan, Plan, TargetPlan
from evc.progress import Progress
from evc.registry import DEVICES, FORMATS
from evc.scripts import render_scripts, templates_digest

LOWERED = "lowered.json"


@dataclass
class LowerContext:
    """What a format backend may ask of the build besides the Program and its target."""

    plan: Plan
    target: TargetPlan

    def images(self, data_name: str):
        """A data block's images, preprocessed as the model expects (N×3×H×W float32)."""
        from evc.data import load_images

        return load_images(self.plan.data[data_name], self.plan.model.input)


@dataclass
class BuildResult:
    target: str
    bundle: Path
    cached: bool
    manifest: dict


def build(plan: Plan, out: Path, force: bool = False, only: list[str] | None = None,
          progress: Progress | None = None, main: bool = True) -> list[BuildResult]:
    """Build every target (those in `only`) whose bundle is not up to date.

    Under torchrun, every process runs the passes (finetune trains on all of
    them) and only the `main` one writes: caches, bundles, the evaluation.
    """
    progress = progress or Progress()
    cache = Cache(out / ".cache", fresh=force)
    weights = weights_digest(plan)
    program_key = passes_key(plan, load_key(plan, weights))
    compiled: Compiled | None = None
    evaluation: dict | None = None
    results = []
    for target in plan.targets:
        if only and target.name not in only:
            continue
        bundle = out / plan.stem / target.name
        key = target_key(plan, target, program_key)
        recover(bundle)
        manifest = read_manifest(bundle)
        if not force and manifest and manifest.get("cache_key") == key:
            results.append(BuildResult(target.name, bundle, True, _restamp(manifest, plan, bundle)))
            continue
        if compiled is None:
            compiled = compile_model(plan, cache, progress, weights, write_cache=main)
        if not main:
            break
        if plan.evaluate and evaluation is None:
            evaluation = _evaluation(plan, compiled, cache, progress, weights)
        manifest = build_target(plan, target, compiled, cache, bundle, key, progress, evaluation)
        results.append(BuildResult(target.name, bundle, False, manifest))
    return results


def _evaluation(plan: Plan, compiled: Compiled, cache: Cache, progress: Progress, weights: str) -> dict:
    from evc.evaluate import evaluate_models

    with progress.stage(f"evaluate on {plan.evaluate.data}"):
        original, _ = loaded(plan, cache, progress, weights)
        return evaluate_models(plan, compiled, original, cache, load_key(plan, weights))


def _restamp(manifest: dict, plan: Plan, bundle: Path) -> dict:
    """A spec edit that changes no result (a comment) still shows in the manifest's spec record."""
    spec = _spec_record(plan)
    if manifest["spec"] != spec:
        manifest["spec"] = spec
        tmp = bundle / f".{MANIFEST}.tmp"
        write_json(tmp, manifest)
        os.replace(tmp, bundle / MANIFEST)
    return manifest


def _spec_record(plan: Plan) -> dict:
    return {"path": str(plan.path), "sha256": hashlib.sha256(plan.text.encode()).hexdigest()}


def validation_data(plan: Plan, target: TargetPlan) -> DataPlan:
    name = target.params.get("validate")
    return plan.data[name] if name else DEFAULT_VALIDATION


def lower_key(plan: Plan, target: TargetPlan, program_key: str) -> str:
    fmt = FORMATS[target.format]
    params = {p.name: target.params[p.name] for p in fmt.params}
    data = [validation_data(plan, target)] + [plan.data[name] for name in data_refs(fmt.params, params)]
    evaluate = plan.evaluate and [data_identity(plan.data[plan.evaluate.data]), plan.evaluate.top]
    return stage_key("lower", program_key, target.format, params, [data_identity(d) for d in data],
                     DEVICES[target.device].facts, evaluate)


def target_key(plan: Plan, target: TargetPlan, program_key: str) -> str:
    device = DEVICES[target.device]
    return stage_key("target", lower_key(plan, target, program_key), target,
                     templates_digest(device.templates, device.files), plan.path.name)


def build_target(plan: Plan, target: TargetPlan, compiled: Compiled, cache: Cache, bundle: Path,
                 key: str, progress: Progress, evaluation: dict | None = None) -> dict:
    lkey = lower_key(plan, target, compiled.key)
    lowered = cache.get("lower", lkey)
    if lowered is None:
        lowered = cache.put("lower", lkey, lambda folder: _lower_and_validate(plan, target, compiled, folder,
                                                                             bundle, progress))
    checked = json.loads((lowered / LOWERED).read_text())
    with staged(bundle) as folder:
        # Copies, not links: editing a bundle's file in place must not change the cache.
        shutil.copytree(lowered, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(LOWERED))
        manifest = _manifest(plan, target, compiled, checked, key)
        if evaluation is not None:
            manifest["evaluation"] = evaluation
        context = _script_context(plan, target, manifest, bundle)
        device = DEVICES[target.device]
        manifest["scripts"] = render_scripts(device.templates, context, folder, device.files)
        write_json(folder / MANIFEST, manifest)
    return manifest


def _lower_and_validate(plan: Plan, target: TargetPlan, compiled: Compiled, folder: Path, bundle: Path,
                        progress: Progress) -> None:
    from evc.data import load_images
    from evc.parity import compare

    backend = FORMATS[target.format].backend
    with progress.stage(f"lower to {target.format} for target '{target.name}'"):
        try:
            artifacts = backend.lower(compiled.program, target, folder, LowerContext(plan, target))
        except EvcError:
            raise
        except Exception as e:  # the exporter's own message names the op or node at fault
            reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise BuildError(f"target '{target.name}': lowering to {target.format} failed: {reason}") from e
    data = validation_data(plan, target)
    with progress.stage(f"validate target '{target.name}' on {data.name}"):
        images = load_images(data, plan.model.input)
        reference = compiled.program.run(images).numpy()
        failures = []
        for artifact in artifacts:
            parity = compare(reference, backend.run(folder / artifact.path, images))
            artifact.parity = parity.to_dict()
            reason = backend.check_parity(parity, target.params, artifact)
            if reason:
                failures.append(f"{artifact.path}: {reason}")
    if plan.evaluate:
        _score(plan, target, backend, folder, artifacts, progress)
    described = [a.describe(folder) for a in artifacts]
    checked = {"artifacts": described, "output_shape": [1, *reference.shape[1:]],
               "validation": {"data": data.name, "samples": len(images)}}
    write_json(folder / LOWERED, checked)
    if failures:
        failed = bundle.with_name(f"{bundle.name}.failed")
        keep = temp_dir(failed)
        shutil.copytree(folder, keep, dirs_exist_ok=True)
        write_json(keep / MANIFEST, {**_manifest(plan, target, compiled, checked, None), "failed": failures})
        replace_dir(keep, failed)
        raise BuildError(f"target '{target.name}' failed parity against PyTorch: {'; '.join(failures)}; "
                         f"the failed artifact is kept in {failed}")


def _score(plan: Plan, target: TargetPlan, backend, folder: Path, artifacts, progress: Progress) -> None:
    """Each artifact's top-k on the evaluate block's data, run in its own runtime here."""
    from evc.evaluate import accuracy, labelled

    with progress.stage(f"evaluate target '{target.name}' on {plan.evaluate.data}"):
        images, labels = labelled(plan)
        for artifact in artifacts:
            artifact.accuracy = accuracy(backend.run(folder / artifact.path, images), labels, plan.evaluate.top)


def _manifest(plan: Plan, target: TargetPlan, compiled: Compiled, checked: dict, key: str | None) -> dict:
    model, image = plan.model, plan.model.input
    weights = ("random" if compiled.weights == "random"
               else {"path": str(model.weights), "sha256": compiled.weights})
    return canonical({
        "evc_version": evc.__version__,
        "spec": _spec_record(plan),
        "model": {"name": model.name, "source": str(model.source), "weights": weights},
        "input": {"name": "input", "shape": list(image.shape), "dtype": "float32", "layout": "NCHW",
                  "preprocessing": {"color": "RGB", "scale": "pixels / 255", "mean": list(image.mean),
                                    "std": list(image.std), "crop_pct": image.crop_pct,
                                    "interpolation": image.interpolation}},
        "output": {"name": "logits", "shape": checked["output_shape"]},
        "structure": _structure_record(compiled.program),
        "passes": [{"name": p.name, "params": canonical(p.params), **({"found": found} if found else {})}
                   for p, found in zip(plan.passes, compiled.found)],
        "params_macs": {"before": compiled.before, "after": compiled.after},
        "target": {"name": target.name, "device": target.device, "format": target.format,
                   "params": canonical(target.params)},
        "artifacts": checked["artifacts"],
        "validation": checked["validation"],
        "libraries": library_versions(),
        "cache_key": key,
    })


def _structure_record(program) -> dict:
    """The recognised structure, less the per-block node lists that only passes need."""
    if program.structure is None:
        return {"recognised": False, "reason": program.unrecognised}
    record = {"recognised": True, **program.structure.to_dict()}
    for block in record["blocks"]:
        block.pop("nodes", None)
    return record


def _script_context(plan: Plan, target: TargetPlan, manifest: dict, bundle: Path) -> dict:
    return {
        **target.params,
        "evc_version": evc.__version__,
        "spec_name": plan.path.name,
        "spec_path": str(plan.path),
        "target": target,
        "artifact": manifest["artifacts"][0]["path"],
        "artifacts": manifest["artifacts"],
        "input": {**manifest["input"], **manifest["input"]["preprocessing"]},
        "input_shape": manifest["input"]["shape"],
        "output_shape": manifest["output"]["shape"],
        "random_weights": manifest["model"]["weights"] == "random",
        "bundle_path": str(bundle),
    }
