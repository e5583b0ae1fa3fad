"""The load and passes stages: spec model → Program → compressed Program, cached.

    compiled = compile_model(plan, cache, progress)
    compiled.program, compiled.before, compiled.after
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from evc.cache import Cache
from evc.context import PassContext
from evc.errors import InputError, at_value
from evc.keys import Keys, canonical, derive
from evc.spec.plan import Plan
from evc.progress import Progress
from evc.registry import PASSES


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


def compile_model(plan: Plan, cache: Cache, progress: Progress, keys: Keys | None = None,
                  write_cache: bool = True) -> Compiled:
    """The compressed Program, from the cache when it is there; each pass runs in the order written."""
    keys = keys or derive(plan)
    if keys.weights == "random":
        progress.warn(f"model '{plan.model.name}' names no weights: it is randomly initialised, "
                      "so its outputs mean nothing (the bundle is still complete and checked)")
    cached = _fetch(cache, keys.program)
    if cached is not None:
        return Compiled(*cached[:4], keys.weights, keys.program, *cached[4:])

    program, before = loaded(plan, cache, progress, keys, write_cache)
    original, as_loaded_view = program.structure, program_view(program)
    if plan.passes:
        program.require_structure(f"pass {plan.passes[0].name}")
    passes, searched = plan.passes, None
    if plan.budget is not None:
        passes, searched = _searched(plan, program, before, progress, keys, cache if write_cache else None)
    found, as_loaded, whole = [], program, None  # whole: the model decompose split, once it has
    for pass_plan, key in zip(passes, keys.passes):
        with progress.stage(f"pass {pass_plan.name}"):
            ctx = PassContext(plan, pass_plan, as_loaded, key, cache if write_cache else None, progress)
            plugin = PASSES[pass_plan.name].plugin
            if program.parts:  # after decompose: the pass runs on every part, the fusion refitted to `whole`
                program = PASSES["decompose"].plugin.each_part(program, plugin, pass_plan.params, ctx, whole)
            else:
                whole, program = program, plugin.run(program, pass_plan.params, ctx)
        found.append(canonical(ctx.found))
    after = _aligned_summary(program, original) if plan.passes else before
    view = program_view(program)
    if write_cache and plan.passes:
        _store(cache, keys.program, program, before, after, found, searched, as_loaded_view, view)
    return Compiled(program, before, after, found, keys.weights, keys.program, searched, as_loaded_view, view)


def _searched(plan: Plan, program, before: dict, progress: Progress, keys: Keys, cache: Cache | None):
    """The passes with the keep the budget chose filled in, and the search's record; what a lock file beside
    the spec pinned for this budget, model and data, without searching."""
    from evc.passes.budget import BudgetTooSmall, Search, lock_path, pinned, read_lock, target_of
    from evc.context import Context

    record = read_lock(plan.path, keys.budget)
    if record is not None:
        return tuple(pinned(plan.passes, record)), {**record, "pinned": lock_path(plan.path).name}

    params = plan.budget.params
    metric = next(m for m in ("macs", "params", "latency") if params[m] is not None)
    table = None
    if metric == "latency":
        from evc.runtime.profile import table_for

        try:
            table = table_for(plan, params["on"], program, cache, keys.load, progress)
            table.predict(program.structure)
        except InputError as e:
            raise plan.error(plan.budget.spans.get("latency"), f"budget: {e}") from None
    whole = table.predict(program.structure) if table else before["total"][metric]
    target = target_of(params[metric], whole)
    images = Context(plan, progress, program).images(params["data"])[:params["samples"]]

    def run_pass(program_, pass_plan):
        return PASSES[pass_plan.name].plugin.run(program_, pass_plan.params,
                                                 PassContext(plan, pass_plan, program, "", None, progress))

    def probe_pass(program_, pass_plan):  # scores on the budget's images: a trial needs no more
        return PASSES[pass_plan.name].plugin.run(program_, pass_plan.params,
                                                 _Probe(plan, pass_plan, program, images, progress))

    def count(program_) -> dict:
        total = _summary(program_)["total"]
        return {**total, "latency": table.predict(program_.structure)} if table else total

    shown = f"{target:.3g}ms" if table else f"{target / 1e6:.4g}M"
    with progress.stage(f"budget {metric} = {shown}: sensitivity of each block, then the search"):
        try:
            passes, _, record = Search(program, list(plan.passes), metric, target, images, run_pass, count,
                                       probe_pass).run()
        except BudgetTooSmall as e:
            raise plan.error(plan.budget.spans.get(metric), f"budget: {e}") from None
    if table:
        record.update(on=params["on"], table=table.to_dict(), loaded_ms=whole)
    return tuple(passes), record


class _Probe(PassContext):
    """A pass's context in a budget's trials: any data block it scores on reads as the budget's images."""

    def __init__(self, plan: Plan, pass_plan, original, images, progress: Progress):
        super().__init__(plan, pass_plan, original, "", None, progress)
        self._probe = images

    def images(self, data: str):
        return self._probe


def loaded(plan: Plan, cache: Cache, progress: Progress, keys: Keys, write_cache: bool = True):
    """The Program as loaded, before any pass, and its summary: from the cache when it is there."""
    from evc.ir.program import Program
    from evc.model.load import load_model
    from evc.model.preprocess import model_input

    cached = _fetch(cache, keys.load)
    if cached is not None:
        return cached[0], cached[1]
    spans = plan.model.spans
    with progress.stage(f"load {plan.model.source}"):
        module = load_model(plan.model, plan.path.parent, plan)
        with at_value(plan, spans, "input"):
            image = model_input(plan.model, module, plan.path.parent, progress.warn)
        with at_value(plan, spans, "output", "source"):
            program = Program.from_module(module, image, plan.model.output)
        before = _summary(program)
    if write_cache:
        view = program_view(program)
        _store(cache, keys.load, program, before, before, [], None, view, view)
    return program, before


def cached_summary(cache: Cache, key: str) -> dict | None:
    """A cached program's summary without loading it (nor torch): before, after, found, budget, and the
    program_view of the model as loaded and of the program (`loaded`, `view`: None in older entries)."""
    hit = cache.get("program", key)
    return None if hit is None else json.loads((hit / "summary.json").read_text())


def _fetch(cache: Cache, key: str):
    """(program, before, after, found, budget, loaded view, view) from a cached entry, or None."""
    from evc.ir.program import Program

    summaries = cached_summary(cache, key)
    if summaries is None:
        return None
    return (Program.load(cache.path("program", key) / "program.pt"), summaries["before"], summaries["after"],
            summaries["found"], summaries.get("budget"), summaries.get("loaded"), summaries.get("view"))


def _store(cache: Cache, key: str, program, before: dict, after: dict, found: list, budget: dict | None = None,
           loaded_view: dict | None = None, view: dict | None = None) -> None:
    with cache.entry("program", key) as folder:
        program.save(folder / "program.pt")
        (folder / "summary.json").write_text(json.dumps({"before": before, "after": after, "found": found,
                                                         "budget": budget, "loaded": loaded_view, "view": view}))


def program_view(program) -> dict:
    """What `evc explain` shows of a program, as JSON, so that a cached one is shown without loading it:
    its input, its structure (the manifest's record, and in words) or why it was not recognised, and a
    decomposed model's parts and fusion."""
    view = {"input": list(program.input.shape), "structure": None, "describe": None,
            "unrecognised": program.unrecognised}
    if program.structure is not None:
        record = program.structure.to_dict()
        for block in record["blocks"]:
            block.pop("nodes", None)
        view.update(structure=canonical(record), describe=program.structure.describe(), unrecognised=None)
    if program.parts:
        view["parts"] = [{"name": p.name, "classes": list(p.classes), "width": p.width,
                          "describe": p.program.structure.describe()} for p in program.parts]
        linear = program.fusion.linear
        view["fusion"] = {"in": linear.in_features, "out": linear.out_features, "drop": bool(program.fusion.drop)}
    return view


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


def _aligned_summary(program, original) -> dict:
    """The summary of `program` aligned to the original's blocks; for a decomposed model, its parts' summed
    block by block (each part's own in `parts`), with the fusion in the head."""
    if not program.parts:
        return aligned(_summary(program), original, program.structure)
    from evc.ir.macs import params_of

    parts = [aligned(_summary(p.program), original, p.program.structure) for p in program.parts]
    fusion = {"params": params_of(program.graph, ["fusion"]), "macs": program.fusion.linear.weight.numel()}
    blocks = [{**rows[0], **{k: sum(r[k] for r in rows) for k in ("heads", "hidden", "params", "macs")},
               "parts": {k: {c: sum(r["parts"][k][c] for r in rows if r.get("parts")) for c in ("params", "macs")}
                         for k in ("attention", "mlp", "tokens")}}
              for rows in zip(*(p["blocks"] for p in parts))]
    stem, head = ({k: sum(p[part][k] for p in parts) for k in ("params", "macs")} for part in ("stem", "head"))
    head = {k: head[k] + fusion[k] for k in head}
    total = {k: sum(p["total"][k] for p in parts) + fusion[k] for k in ("params", "macs")}
    return canonical({"stem": stem, "blocks": blocks, "head": head, "total": total,
                      "parts": [{"name": p.name, "classes": list(p.classes), "width": p.width, **s["total"]}
                                for p, s in zip(program.parts, parts)],
                      "fusion": fusion})


def _module_names(block) -> list[str]:
    names = [*block.attn.qkv, block.attn.proj, *block.attn.mixers] if block.attn else []
    return names + ([block.mlp.fc1, block.mlp.fc2, *filter(None, [block.mlp.gate])] if block.mlp else [])


def _summary(program) -> dict:
    from evc.ir import summarize

    return canonical(summarize(program.graph, program.structure, program.example()).to_dict())

