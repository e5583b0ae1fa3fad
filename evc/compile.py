"""The load and passes stages: spec model → Program → compressed Program, cached.

    compiled = compile_model(plan, cache, progress)
    compiled.program, compiled.before, compiled.after
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evc.artifact import sha256_file
from evc.cache import Cache, canonical, library_versions, stage_key
from evc.data import data_identity, load_images
from evc.errors import SpecError
from evc.params import Invalid, ModelRef, data_refs, per_layer
from evc.plan import PassPlan, Plan
from evc.progress import Progress
from evc.registry import PASSES


def weights_digest(plan: Plan) -> str:
    return sha256_file(plan.model.weights) if plan.model.weights else "random"


def load_key(plan: Plan, weights: str) -> str:
    return stage_key("load", plan.model.source, plan.model.input, weights, source_code_digest(plan),
                     library_versions())


def source_code_digest(plan: Plan) -> str | None:
    """For `python("pkg.module:factory")`, the module file's sha256, found without importing it."""
    if plan.model.source.kind != "python":
        return None
    module = plan.model.source.name.split(":")[0].replace(".", "/")
    for base in (plan.path.parent, *map(Path, filter(None, sys.path))):
        for candidate in (base / f"{module}.py", base / module / "__init__.py"):
            if candidate.is_file():
                return sha256_file(candidate)
    return None


def passes_key(plan: Plan, load: str, upto: int | None = None) -> str:
    """The key of the program after the passes (after the first `upto` of them)."""
    passes = plan.passes[:upto]
    if not passes:
        return load
    used = {name: data_identity(plan.data[name]) for p in passes
            for name in data_refs(PASSES[p.name].params, p.params)}
    teachers = {name: (plan.teachers[name], sha256_file(plan.teachers[name].weights)
                       if plan.teachers[name].weights else "random")
                for p in passes for name in data_refs(PASSES[p.name].params, p.params, ModelRef)
                if name in plan.teachers}
    return stage_key("passes", load, passes, used, teachers)


@dataclass
class PassContext:
    """What a pass may ask of the build besides its Program."""

    plan: Plan
    pass_plan: PassPlan
    original: object = None  # the Program as loaded, before any pass: a teacher for finetune
    key: str = ""  # the key of the program this pass makes: what its own cache entries are keyed by
    cache: Cache | None = None  # None where the build may not write (evc explain, torchrun ranks but 0)
    progress: Progress | None = None
    found: dict = field(default_factory=dict)  # what the pass chose, for the manifest and `evc explain`

    def per_layer(self, key: str, depth: int) -> tuple:
        """The pass's `key` for each of `depth` blocks; a list of the wrong length is a spec error."""
        try:
            return per_layer(self.pass_plan.params[key], depth)
        except Invalid as e:
            raise self.plan.error(e.span, f"{self.pass_plan.name}: {key}: {e.message}") from None

    def images(self, data_name: str) -> np.ndarray:
        return load_images(self.plan.data[data_name], self.plan.model.input)

    def dataset(self, data_name: str, train: bool = False):
        """A data block as a lazy dataset of (image, label); `train` applies timm's training transform."""
        from evc.data import dataset

        return dataset(self.plan.data[data_name], self.plan.model.input, train)

    def workspace(self) -> Path | None:
        """A folder in the cache that this pass may keep files in across interrupted builds (checkpoints);
        None where this build writes nothing."""
        if self.cache is None:
            return None
        folder = self.cache.root / "work" / self.key
        if self.cache.fresh:
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def report(self, key: str, value) -> None:
        """Record a value the pass chose (a schedule it searched for), ready to paste as `key`."""
        self.found[key] = value

    def error(self, key: str, message: str) -> SpecError:
        """A spec error at this pass's `key` (or the pass itself), found once the model is known."""
        return self.plan.error(self.pass_plan.spans.get(key), f"{self.pass_plan.name}: {message}")


@dataclass
class Compiled:
    program: object  # evc.program.Program
    before: dict  # params and MACs per block, of the model as loaded
    after: dict  # the same after the passes
    found: list  # per pass, in order: {key: value} for values the pass chose itself (a searched schedule)
    weights: str  # the checkpoint's sha256, or "random"
    key: str


def compile_model(plan: Plan, cache: Cache, progress: Progress, weights: str | None = None,
                  write_cache: bool = True) -> Compiled:

    weights = weights or weights_digest(plan)
    key = passes_key(plan, load_key(plan, weights))
    if weights == "random":
        progress.warn(f"model '{plan.model.name}' names no weights: it is randomly initialised, "
                      "so its outputs mean nothing (the bundle is still complete and checked)")
    cached = _fetch(cache, key)
    if cached is not None:
        return Compiled(*cached, weights, key)

    program, before = loaded(plan, cache, progress, weights, write_cache)
    original = program.structure
    if plan.passes:
        program.require_structure(f"pass {plan.passes[0].name}")
    found, as_loaded, load = [], program, load_key(plan, weights)
    for i, pass_plan in enumerate(plan.passes):
        with progress.stage(f"pass {pass_plan.name}"):
            ctx = PassContext(plan, pass_plan, as_loaded, passes_key(plan, load, i + 1),
                              cache if write_cache else None, progress)
            program = PASSES[pass_plan.name].run(program, pass_plan.params, ctx)
        found.append(canonical(ctx.found))
    after = aligned(_summary(program), original, program.structure) if plan.passes else before
    if write_cache and plan.passes:
        _store(cache, key, program, before, after, found)
    return Compiled(program, before, after, found, weights, key)


def loaded(plan: Plan, cache: Cache, progress: Progress, weights: str, write_cache: bool = True):
    """The Program as loaded, before any pass, and its summary: from the cache when it is there."""
    from evc.load import load_model
    from evc.program import Program

    key = load_key(plan, weights)
    cached = _fetch(cache, key)
    if cached is not None:
        return cached[0], cached[1]
    with progress.stage(f"load {plan.model.source}"):
        module = load_model(plan.model, plan.path.parent)
        program = Program.from_module(module, plan.model.input)
        before = _summary(program)
    if write_cache:
        _store(cache, key, program, before, before, [])
    return program, before


def _fetch(cache: Cache, key: str):
    """(program, before, after, found) from a cached entry, or None."""
    from evc.program import Program

    hit = cache.get("program", key)
    if hit is None:
        return None
    summaries = json.loads((hit / "summary.json").read_text())
    return Program.load(hit / "program.pt"), summaries["before"], summaries["after"], summaries["found"]


def _store(cache: Cache, key: str, program, before: dict, after: dict, found: list) -> None:
    def write(folder: Path) -> None:
        program.save(folder / "program.pt")
        (folder / "summary.json").write_text(json.dumps({"before": before, "after": after, "found": found}))

    cache.put("program", key, write)


def aligned(after: dict, original, compressed) -> dict:
    """`after`'s block rows in the original model's block order, matched by module names.

    A block that a pass removed whole is a row of zeros, so before and after
    read side by side, block by block.
    """
    owner = {name: b.index for b in original.blocks for name in _module_names(b)}
    rows = {}
    for row, block in zip(after["blocks"], compressed.blocks):
        origin = next((owner[n] for n in _module_names(block) if n in owner), None)
        if origin is not None:
            rows.setdefault(origin, {**row, "index": origin})
    gone = {"heads": 0, "hidden": 0, "params": 0, "macs": 0}
    blocks = [rows.get(b.index, {"index": b.index, "tokens": b.tokens, **gone}) for b in original.blocks]
    return {**after, "blocks": blocks}


def _module_names(block) -> list[str]:
    names = [*block.attn.qkv, block.attn.proj] if block.attn else []
    return names + ([block.mlp.fc1, block.mlp.fc2] if block.mlp else [])


def _summary(program) -> dict:
    from evc.ir import summarize

    return canonical(summarize(program.graph, program.structure, program.example()).to_dict())

