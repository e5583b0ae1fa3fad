"""The bundle stage: checked artifacts → `OUT/<spec stem>/<target>/`, with manifest, scripts and README.

    manifest = write(plan, target, compiled, lowered, checked, key, bundle, evaluation)
    manifest = current(bundle, key)     # the bundle's manifest if it was built with this key, else None

A bundle is written into a hidden temporary folder beside its final place and
renamed into place only when complete; the previous good bundle is moved
aside, not deleted, until the new one is in place. So no one ever sees half
of one, and an interrupted or failed build never destroys the last good one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import evc
from evc.atomic import recover, replace_dir, require_space, staged, temp_dir
from evc.errors import BuildError
from evc.keys import canonical, library_versions, text_digest
from evc.layout import MANIFEST, read_manifest, write_json
from evc.spec.plan import HubWeights, Plan, TargetPlan


def write(plan: Plan, target: TargetPlan, compiled, lowered: Path, checked: dict, key: str, bundle: Path,
          evaluation: dict | None = None) -> dict:
    """Write the target's bundle from the lowered artifacts; its manifest carries `key`."""
    from evc.bundle.scripts import render_scripts
    from evc.bundle.verify import verify
    from evc.cache import digests
    from evc.registry import DEVICES

    what = f"write the bundle of target '{target.name}'"
    require_space(bundle, sum(f.stat().st_size for f in lowered.rglob("*") if f.is_file()), what)
    with staged(bundle, what) as folder:
        copy_artifacts(lowered, folder)
        if target.params.get("peers"):  # the placement is the target's, not the artifacts': not in the lower cache
            from evc.runtime.collab.contract import place

            place(folder, target.params["peers"])
        manifest = _manifest(plan, target, compiled, checked, key)
        if evaluation is not None:
            manifest["evaluation"] = evaluation
        manifest["scripts"] = render_scripts(DEVICES[target.device], _script_context(plan, target, manifest, bundle),
                                             folder)
        manifest["files"] = digests(folder)
        write_json(folder / MANIFEST, manifest)
        problems = verify(folder)  # the artifacts as copied against the digests taken when they were lowered
        if problems:
            raise BuildError(f"target '{target.name}': the bundle's files do not match its manifest, so it was not "
                             f"written: {'; '.join(problems)}")
    return manifest


def current(bundle: Path, key: str) -> dict | None:
    """The bundle's manifest if the bundle was built with `key`: nothing it depends on has changed."""
    recover(bundle)
    manifest = read_manifest(bundle)
    return manifest if manifest and manifest.get("cache_key") == key else None


def restamp(manifest: dict, plan: Plan, bundle: Path) -> dict:
    """A spec edit that changes no result (a comment) still shows in the manifest's spec record."""
    spec = _spec_record(plan)
    if manifest["spec"] != spec:
        manifest["spec"] = spec
        tmp = bundle / f".{MANIFEST}.tmp"
        write_json(tmp, manifest)
        os.replace(tmp, bundle / MANIFEST)
    return manifest


def keep_failed(plan: Plan, target: TargetPlan, compiled, failure, bundle: Path) -> Path:
    """The artifacts of a ParityFailure as `<bundle>.failed/`, with a manifest saying why; its copy is removed."""
    failed = bundle.with_name(f"{bundle.name}.failed")
    keep = temp_dir(failed)
    try:
        shutil.copytree(failure.artifacts, keep, dirs_exist_ok=True)
        write_json(keep / MANIFEST, {**_manifest(plan, target, compiled, failure.checked, None),
                                     "failed": failure.failures})
        replace_dir(keep, failed)
    finally:
        shutil.rmtree(failure.artifacts, ignore_errors=True)
    return failed


def copy_artifacts(lowered: Path, folder: Path) -> None:
    """The cached artifacts into a bundle being written: copies, not links, so editing a bundle's file in place
    cannot change the cache."""
    from evc.cache import DIGESTS
    from evc.targets.lower import CHECKED

    shutil.copytree(lowered, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(CHECKED, DIGESTS))


# ---- the manifest's schema ------------------------------------------------------------------------

def _manifest(plan: Plan, target: TargetPlan, compiled, checked: dict, key: str | None) -> dict:
    model, image = plan.model, compiled.program.input
    return canonical({
        "evc_version": evc.__version__,
        "spec": _spec_record(plan),
        "model": {"name": model.name, "source": str(model.source),
                  "weights": _weights_record(model, compiled, plan.path.parent)},
        "input": {"name": "input", "shape": list(image.shape), "dtype": "float32", "layout": "NCHW",
                  "preprocessing": {"color": "RGB", "scale": "pixels / 255", "mean": list(image.mean),
                                    "std": list(image.std), "crop_pct": image.crop_pct,
                                    "interpolation": image.interpolation, "source": dict(image.origin)}},
        "output": {"name": "logits", "shape": checked["output_shape"]},
        "structure": _structure_record(compiled.program),
        "groups": (compiled.loaded or {}).get("groups"),  # the model as loaded: what the passes could cut
        **({"decomposition": _decomposition_record(compiled, target, checked["artifacts"])}
           if compiled.program.parts else {}),
        "passes": [{"name": p.name, "params": canonical(p.params), **({"found": found} if found else {})}
                   for p, found in zip(plan.passes, compiled.found)],
        "params_macs": {"before": compiled.before, "after": compiled.after},
        **({"budget": {**compiled.budget, **({"timed": checked["latency"]} if "latency" in checked else {})}}
           if compiled.budget else {}),
        "target": {"name": target.name, "device": target.device, "format": target.format,
                   "params": canonical(target.params)},
        "artifacts": checked["artifacts"],
        "validation": checked["validation"],
        "libraries": library_versions(),
        "cache_key": key,
    })


def _weights_record(model, compiled, spec_dir: Path) -> str | dict:
    """"random", the file and its sha256, a Hub checkpoint pinned by repository, commit, file and sha256, or an
    hf source's files: a folder's sha256, a cached repository's pinned by repository, commit and sha256."""
    from evc.model.hf import hf_folder, hf_snapshot
    from evc.model.hub import fetch

    if compiled.weights == "random":
        return "random"
    if model.weights is None:  # an hf source brings its own: a folder, or a cached repository's snapshot
        if hf_folder(model.source.name, spec_dir) is not None:
            return {"source": str(model.source), "sha256": compiled.weights}
        snapshot = hf_snapshot(model.source.name, dict(model.source.kwargs), spec_dir)
        return {"source": str(model.source), "hub": snapshot.repo, "revision": snapshot.revision,
                "sha256": compiled.weights}
    if isinstance(model.weights, HubWeights):
        checkpoint = fetch(model.weights)
        return {"hub": checkpoint.repo, "revision": checkpoint.revision, "file": checkpoint.file,
                "sha256": compiled.weights}
    return {"path": str(model.weights), "sha256": compiled.weights}


def _spec_record(plan: Plan) -> dict:
    return {"path": str(plan.path), "sha256": text_digest(plan.text)}


def _decomposition_record(compiled, target: TargetPlan, artifacts: list[dict]) -> dict:
    """A decomposed model's parts: the model served, classes, costs, what each sends per image; the fusion;
    how to run them."""
    program, image = compiled.program, compiled.program.input
    costs = {p["name"]: p for p in compiled.after["parts"]}
    pixels = 3 * image.height * image.width  # (1, 3, H, W): float32 images, or uint8 pixels from picture files
    sent = {"request": 4 * pixels, "request_pixels": pixels}
    served = {p.name: next(a["path"] for a in artifacts if a["path"].startswith(f"{p.name}/")) for p in program.parts}
    parts = [{"name": p.name, "model": served[p.name], "classes": list(p.classes), "width": p.width,
              "macs": costs[p.name]["macs"],
              "params": costs[p.name]["params"], "bytes_per_image": {**sent, "reply": 4 * p.width},
              "structure": _structure_record(p.program)} for p in program.parts]
    peers = list(target.params.get("peers") or ())
    for part, peer in zip(parts, peers):
        part["peer"] = peer
    same = all(p["structure"] == parts[0]["structure"] for p in parts)  # heads, units, tokens in every block
    return {"parts": parts, "same_shapes": same,
            "fusion": {**compiled.after["fusion"], "degraded_ok": bool(program.fusion.drop)},
            "run": "evc serve BUNDLE --part K --port P on each device, then evc infer BUNDLE --peers HOST:PORT,..."}


def _structure_record(program) -> dict:
    """The recognised structure, less the per-block node lists that only passes need."""
    from evc.ir.summary import structure_record

    if program.structure is None:
        return {"recognised": False, "reason": program.unrecognised}
    return {"recognised": True, **structure_record(program.structure)}


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
        "decomposition": manifest.get("decomposition"),
    }
