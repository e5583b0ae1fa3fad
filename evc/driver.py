"""The build: a checked Plan through every stage to one bundle per target.

    results = build(plan, out=Path("build"))

    Plan ─keys→ Keys                          evc.keys      every stage's key, once
         ─load, passes→ compressed Program     evc.passes.compress  cached by keys.program
         ─evaluate→ accuracy before and after  evc.runtime.evaluate  with an evaluate block
         ─lower, validate→ checked artifacts   evc.targets.lower     per target, cached by keys.lower
         ─bundle→ OUT/<stem>/<target>/         evc.bundle.write    atomic, stamped with keys.bundle
         ─report→ OUT/<stem>/report.html       evc.tools.report    every bundle of the build, on one page

A target whose bundle already carries its key is left alone without loading
torch, so an unchanged spec rebuilds in well under a second and changing one
target re-runs only that target.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from evc.bundle import write as bundles
from evc.cache import Cache
from evc.keys import derive
from evc.spec.plan import Plan
from evc.progress import Progress


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
    keys = derive(plan)
    compiled = evaluation = None
    results = []
    for target in plan.targets:
        if only and target.name not in only:
            continue
        folder = out / plan.stem / target.name
        manifest = None if force else bundles.current(folder, keys.bundle[target.name])
        if manifest is not None:
            results.append(BuildResult(target.name, folder, True, bundles.restamp(manifest, plan, folder)))
            continue
        if compiled is None:
            from evc.passes.compress import compile_model

            compiled = compile_model(plan, cache, progress, keys, write_cache=main)
        if not main:
            break
        if plan.evaluate and evaluation is None:
            evaluation = _evaluation(plan, compiled, keys, cache, progress)
        from evc.targets.lower import lower

        lowered, checked = lower(plan, target, compiled, keys.lower[target.name], cache, progress, folder)
        manifest = bundles.write(plan, target, compiled, lowered, checked, keys.bundle[target.name], folder,
                                 evaluation)
        results.append(BuildResult(target.name, folder, False, manifest))
    if main and results:
        _report(out / plan.stem, progress)
    return results


def _report(folder: Path, progress: Progress) -> None:
    """The build's report.html, unless it is newer than everything it reads (an unchanged rebuild)."""
    from evc.tools.report import is_current, write_report

    if not is_current(folder):
        with progress.stage("report"):
            write_report(folder)


def _evaluation(plan: Plan, compiled, keys, cache: Cache, progress: Progress) -> dict:
    from evc.passes.compress import loaded
    from evc.runtime.evaluate import evaluate_models

    with progress.stage(f"evaluate on {plan.evaluate.data}"):
        original, _ = loaded(plan, cache, progress, keys)
        return evaluate_models(plan, compiled, original, cache, keys.evaluate)
