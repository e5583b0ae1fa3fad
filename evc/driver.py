"""The build: a checked Plan through every stage to one bundle per target.

    results = build(plan, out=Path("build"))

    Plan ─keys→ Keys                          evc.keys            every stage's key, once
         ─load→ Program as loaded             evc.ir.capture      cached by keys.load
         ─passes→ compressed Program          evc.passes.compress cached by keys.program
         ─evaluate→ accuracy before and after evc.runtime.evaluate with an evaluate block
         ─lower, validate→ checked artifacts  evc.targets.lower   per target, cached by keys.lower
         ─bundle→ OUT/<stem>/<target>/        evc.bundle.write    atomic, stamped with keys.bundle
         ─report→ OUT/<stem>/report.html      evc.tools.report    every bundle of the build, on one page

A target whose bundle already carries its key is left alone without loading
torch, so an unchanged spec rebuilds in well under a second and changing one
target re-runs only that target.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from evc.bundle import write as bundles
from evc.cache import Cache
from evc.errors import BuildError, PassFailure
from evc.keys import Keys, derive
from evc.progress import Progress
from evc.spec.plan import Plan


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
    stages = Stages(plan, Cache(out / ".cache", fresh=force, warn=progress.warn), progress, write_cache=main)
    try:
        results = _targets(plan, out, force, only, stages, main)
    except PassFailure as failure:
        if not (main and failure.reproducer):
            raise
        kept = _reproducer(out / plan.stem / "reproducer", failure)
        raise PassFailure(f"{failure}; a reproducer is in {kept}") from None
    if main and results:
        _report(out / plan.stem, progress)
    return results


def _targets(plan: Plan, out: Path, force: bool, only, stages, main: bool) -> list[BuildResult]:
    results = []
    for target in plan.targets:
        if only and target.name not in only:
            continue
        folder = out / plan.stem / target.name
        manifest = None if force else bundles.current(folder, stages.keys.bundle[target.name])
        if manifest is not None:
            results.append(BuildResult(target.name, folder, True, bundles.restamp(manifest, plan, folder)))
            continue
        stages.compiled  # under torchrun, every process runs the passes
        if not main:
            break
        results.append(BuildResult(target.name, folder, False, stages.bundle(target, folder)))
    return results


REPRODUCE = """\
evc made a model that does not compute what it should: this is evc's bug, not yours.
{message}

reproducer.pt holds the captured model before the pass ("graph", a torch.fx GraphModule), the pruning group
cut ("group": its members, channels and sizes as plain data), the channels kept ("keep") and the input the
check ran ("input"). Please attach this folder to a bug report. To look at it:

    import torch
    r = torch.load("reproducer.pt", weights_only=False)
    print(r["graph"].code, r["group"], r["keep"])
"""


def _reproducer(folder: Path, failure: PassFailure) -> Path:
    """Write what reproduces an internal pass failure into `folder`, whole or not at all."""
    import torch

    from evc.atomic import staged

    with staged(folder, "write the reproducer") as tmp:
        torch.save(failure.reproducer, tmp / "reproducer.pt")
        (tmp / "README.txt").write_text(REPRODUCE.format(message=failure))
    return folder


def compile_model(plan: Plan, cache: Cache, progress: Progress, write_cache: bool = True):
    """The compressed Program of `plan` (evc.passes.compress.Compiled), loading the model when the cache does
    not hold it."""
    return Stages(plan, cache, progress, write_cache).compiled


class Stages:
    """Each stage's result for one Plan, computed once when first asked for and handed to the stages after it:
    the Program as loaded, the compressed one, the evaluation."""

    def __init__(self, plan: Plan, cache: Cache, progress: Progress, write_cache: bool = True,
                 keys: Keys | None = None):
        self.plan, self.cache, self.progress, self.write_cache = plan, cache, progress, write_cache
        self.keys = keys or derive(plan)

    @cached_property
    def loaded(self) -> tuple:
        """(the Program as loaded, its summary)."""
        from evc.ir.capture import capture

        return capture(self.plan, self.cache, self.progress, self.keys, self.write_cache)

    @property
    def original(self):
        return self.loaded[0]

    @cached_property
    def compiled(self):
        """The compressed Program (evc.passes.compress.Compiled), from the cache when it is there."""
        from evc.passes.compress import cached, compress

        if self.keys.weights == "random":
            self.progress.warn(f"model '{self.plan.model.name}' names no weights: it is randomly initialised, "
                               "so its outputs mean nothing (the bundle is still complete and checked)")
        hit = cached(self.cache, self.keys)
        if hit is not None:
            return hit
        original, before = self.loaded
        return compress(self.plan, original, before, self.cache, self.progress, self.keys, self.write_cache,
                        self.latency_table)

    def latency_table(self, program):
        """The latency table of the budget's `on` target for `program` (timed here, or read from the cache)."""
        from evc.runtime.profile import table_for

        return table_for(self.plan, self.plan.budget.params["on"], program,
                         self.cache if self.write_cache else None, self.keys.load, self.progress)

    @cached_property
    def evaluation(self) -> dict | None:
        """Accuracy, MACs and latency as loaded and compressed, with an evaluate block; else None."""
        if not self.plan.evaluate:
            return None
        from evc.runtime.evaluate import evaluate_models

        with self.progress.stage(f"evaluate on {self.plan.evaluate.data}"):
            return evaluate_models(self.plan, self.compiled, self.original, self.cache, self.keys.evaluate)

    def bundle(self, target, folder: Path) -> dict:
        """Lower and check `target`, and write its bundle at `folder`; the manifest. Artifacts that miss parity
        are kept as `<folder>.failed/`."""
        from evc.targets.lower import ParityFailure, cached_lower

        compiled, evaluation = self.compiled, self.evaluation
        budget = compiled.budget
        timed = budget and budget["metric"] == "latency" and budget["on"] == target.name
        try:
            lowered, checked = cached_lower(self.plan, target, compiled, self.keys.lower[target.name], self.cache,
                                            self.progress, self.original if timed else None)
        except ParityFailure as failure:
            kept = bundles.keep_failed(self.plan, target, compiled, failure, folder)
            raise BuildError(f"{failure}; the failed artifact is kept in {kept}") from None
        return bundles.write(self.plan, target, compiled, lowered, checked, self.keys.bundle[target.name], folder,
                             evaluation)


def _report(folder: Path, progress: Progress) -> None:
    """The build's report.html, unless it is newer than everything it reads (an unchanged rebuild)."""
    from evc.tools.report import is_current, write_report

    if not is_current(folder):
        with progress.stage("report"):
            write_report(folder)
