"""The passes stage: the Program as loaded → the compressed Program, each pass in the order written; cached.

    compiled = cached(plan, cache, keys)       # None when the cache does not hold it
    compiled = compress(plan, original, before, cache, progress, keys)
    compiled.program, compiled.before, compiled.after
"""

from __future__ import annotations

from dataclasses import dataclass

from evc.cache import Cache
from evc.context import PassContext
from evc.ir.capture import Stored, fetch, program_view, store
from evc.ir.summary import aligned_summary
from evc.keys import Keys, canonical
from evc.progress import Progress
from evc.registry import PASSES
from evc.spec.plan import Plan


@dataclass
class Compiled:
    program: object  # evc.ir.program.Program
    before: dict  # params and MACs per block, of the model as loaded
    after: dict  # the same after the passes
    found: list  # per pass, in order: {key: value} for values the pass chose itself (a searched schedule)
    weights: str  # the checkpoint's sha256, or "random"
    key: str
    budget: dict | None = None  # what a budget's search chose and reached (evc.passes.budget.Search.record)
    loaded: dict | None = None  # program_view of the model as loaded (None from a cache entry older than it)
    view: dict | None = None  # program_view of `program`


def cached(cache: Cache, keys: Keys) -> Compiled | None:
    """The compressed Program from the cache, or None."""
    stored = fetch(cache, keys.program)
    if stored is None:
        return None
    return Compiled(stored.program, stored.before, stored.after, stored.found, keys.weights, keys.program,
                    stored.budget, stored.loaded, stored.view)


def compress(plan: Plan, original, before: dict, cache: Cache, progress: Progress, keys: Keys,
             write_cache: bool = True, latency_table=None) -> Compiled:
    """Run the spec's passes on `original`, the Program as loaded (`before`: its summary); a budget's search
    first, which reads `latency_table(program)` for a latency budget."""
    program, as_loaded_view = original, program_view(original)
    passes, searched = plan.passes, None
    if plan.budget is not None:
        from evc.passes.budget import search

        passes, searched = search(plan, program, before, progress, keys.budget, latency_table)
    found, whole = [], None  # whole: the model a splitting pass split, once one has
    splitter = None
    for pass_plan, key in zip(passes, keys.passes):
        with progress.stage(f"pass {pass_plan.name}"):
            ctx = PassContext(plan, pass_plan, original, key, cache if write_cache else None, progress)
            info = PASSES[pass_plan.name]
            if program.parts:  # after a split: the pass runs on every part, the fusion refitted to `whole`
                program = splitter.each_part(program, info.plugin, pass_plan.params, ctx, whole)
            else:
                whole, program = program, info.plugin.run(program, pass_plan.params, ctx)
                splitter = info.plugin if info.splits else splitter
        found.append(canonical(ctx.found))
    after = aligned_summary(program, original.structure) if plan.passes else before
    view = program_view(program)
    if write_cache and plan.passes:
        store(cache, keys.program, Stored(program, before, after, found, searched, as_loaded_view, view))
    return Compiled(program, before, after, found, keys.weights, keys.program, searched, as_loaded_view, view)
