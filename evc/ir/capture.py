"""The load stage: the spec's model as a Program (loaded, captured, recognised), and Programs in the build cache.

    program, before = capture(plan, cache, progress, keys)     # from the cache when it is there
    store(cache, key, Stored(program, before, ...)); fetch(cache, key)
    cached_summary(cache, key)                                 # without loading it, nor torch
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from evc.errors import at_value
from evc.ir.summary import program_view, summary


@dataclass
class Stored:
    """A Program as the cache keeps it, with what explain and the manifest read of it without loading it."""

    program: object  # evc.ir.program.Program
    before: dict  # params and MACs per block, of the model as loaded
    after: dict  # the same of `program`
    found: list = field(default_factory=list)  # per pass, in order: {key: value} the pass chose itself
    budget: dict | None = None  # what a budget's search chose and reached
    loaded: dict | None = None  # program_view of the model as loaded (None from an entry older than it)
    view: dict | None = None  # program_view of `program`


def capture(plan, cache, progress, keys, write_cache: bool = True):
    """The Program as loaded, before any pass, and its summary: from the cache when it is there."""
    from evc.ir.program import Program
    from evc.model.load import load_model
    from evc.model.preprocess import model_input

    cached = fetch(cache, keys.load)
    if cached is not None:
        return cached.program, cached.before
    spans = plan.model.spans
    with progress.stage(f"load {plan.model.source}"):
        module = load_model(plan.model, plan.path.parent, plan)
        with at_value(plan, spans, "input"):
            image = model_input(plan.model, module, plan.path.parent, progress.warn)
        with at_value(plan, spans, "output", "source"):
            program = Program.from_module(module, image, plan.model.output)
        before = summary(program)
    if write_cache:
        view = program_view(program)
        store(cache, keys.load, Stored(program, before, before, loaded=view, view=view))
    return program, before


def cached_summary(cache, key: str) -> dict | None:
    """A cached program's summary without loading it (nor torch): before, after, found, budget, and the
    program_view of the model as loaded and of the program (`loaded`, `view`: None in older entries)."""
    hit = cache.get("program", key)
    return None if hit is None else json.loads((hit / "summary.json").read_text())


def fetch(cache, key: str) -> Stored | None:
    """The cached Program and its summaries, or None."""
    from evc.ir.program import Program

    summaries = cached_summary(cache, key)
    if summaries is None:
        return None
    return Stored(Program.load(cache.path("program", key) / "program.pt"), summaries["before"],
                  summaries["after"], summaries["found"], summaries.get("budget"), summaries.get("loaded"),
                  summaries.get("view"))


def store(cache, key: str, stored: Stored) -> None:
    with cache.entry("program", key) as folder:
        stored.program.save(folder / "program.pt")
        (folder / "summary.json").write_text(json.dumps({
            "before": stored.before, "after": stored.after, "found": stored.found, "budget": stored.budget,
            "loaded": stored.loaded, "view": stored.view}))
