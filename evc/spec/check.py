"""Check a parsed spec against the registries and turn it into a Plan.

Everything that can be checked without loading a model is checked here, and
every problem is reported at once, in source order:

    >>> plan = check_spec(parse_spec(text, "specs/deit.evc"))
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from evc.errors import Diagnostic, Span, SpecError
from evc.registry import DEVICES, FORMATS, PASSES, exclusion
from evc.spec import ast
from evc.spec.blocks import (
    BLOCK_KINDS,
    BUDGET,
    BUDGET_PARAMS,
    DATA_PARAMS,
    EVALUATE_PARAMS,
    MODEL_PARAMS,
    TARGET_PARAMS,
    check_budget,
    data_problem,
)
from evc.spec.params import Invalid, ModelRef, Param, check_entries, closest, did_you_mean, named_data
from evc.spec.plan import DataPlan, EvaluatePlan, HubWeights, ModelPlan, PassPlan, Plan, TargetPlan, recovering


def parse_and_check(text: str, path: str | Path) -> Plan:
    from evc.spec import parse_spec

    return check_spec(parse_spec(text, str(path)))


def check_spec(spec: ast.Spec) -> Plan:
    checker = _Checker(spec)
    plan = checker.run()
    if checker.diagnostics:
        diagnostics = sorted(checker.diagnostics, key=lambda d: (d.span.line, d.span.col) if d.span else (0, 0))
        raise SpecError(spec.path, spec.source, diagnostics)
    return plan


class _Checker:
    def __init__(self, spec: ast.Spec):
        self.spec = spec
        self.base = Path(spec.path).parent
        self.diagnostics: list[Diagnostic] = []
        self.data_refs: list[tuple[str, Span]] = []
        self.model_refs: list[tuple[str, Span]] = []
        self.budget: PassPlan | None = None
        # Blocks of an unknown kind by the kind they were likely meant to be (`modle small` → model: small). Each
        # is reported once, as unknown; what follows from its absence (no model block, undefined data) is not.
        self.misspelt: dict[str, list[str | None]] = {}

    def report(self, message: str, span: Span | None, hint: str | None = None) -> None:
        self.diagnostics.append(Diagnostic(message, span, hint))

    def run(self) -> Plan | None:
        by_kind: dict[str, list[ast.Block]] = {k: [] for k in BLOCK_KINDS}
        for block in self.spec.blocks:
            if block.kind in by_kind:
                by_kind[block.kind].append(block)
            else:
                self.report(f"unknown block '{block.kind}'", block.span, did_you_mean(block.kind, BLOCK_KINDS))
                self.misspelt.setdefault(closest(block.kind, BLOCK_KINDS), []).append(block.name)
        model = self.model(by_kind["model"])
        data_blocks = self.named(by_kind["data"], "data")
        data = {d.name: d for b in data_blocks if (d := self.data(b)) is not None}
        passes = self.compress(by_kind["compress"])
        evaluate = self.evaluate(by_kind["evaluate"])
        teachers = self.teachers(by_kind["model"][1:], model)
        targets = tuple(t for b in self.named(by_kind["target"], "target") if (t := self.target(b)))
        if not by_kind["target"] and "target" not in self.misspelt:
            self.report("the spec has no target block; add one, e.g. `target cpu { device = cpu, format = onnx }`",
                        self.spec.header_span)
        if self.budget is not None and self.budget.params["on"] is not None:
            self.budget_target(self.budget, targets, [b.name for b in by_kind["target"]])
        defined = [b.name for b in data_blocks]  # a block with its own errors is still defined
        for name, span in self.data_refs:
            if name not in defined and name not in self.misspelt.get("data", ()):
                self.report(f"undefined data '{name}'", span, did_you_mean(name, defined) or self._defined(defined))
        if self.diagnostics or model is None:
            return None
        return Plan(Path(self.spec.path), self.spec.source, model, data, passes, targets, evaluate, teachers,
                    self.budget)

    @staticmethod
    def _defined(data) -> str:
        return f"defined data blocks: {', '.join(data)}" if data else "define it with `data NAME { synthetic = 64 }`"

    def named(self, blocks: list[ast.Block], kind: str) -> list[ast.Block]:
        """Blocks that have a name not used before; reports the others."""
        seen: dict[str, ast.Block] = {}
        for block in blocks:
            if block.name is None:
                self.report(f"a {kind} block needs a name, as in `{kind} NAME {{ ... }}`", block.span)
            elif block.name in seen:
                line = seen[block.name].name_span.line
                self.report(f"duplicate {kind} '{block.name}' (first defined on line {line})", block.name_span)
            else:
                seen[block.name] = block
        return list(seen.values())

    def model(self, blocks: list[ast.Block]) -> ModelPlan | None:
        """The first model block: the model compressed. Any others are teachers (see `teachers`)."""
        if not blocks:
            if "model" not in self.misspelt:
                self.report("the spec has no model block", self.spec.header_span)
            return None
        block = blocks[0]
        if block.name is None:
            self.report("the model block needs a name, as in `model deit_tiny { ... }`", block.span)
            return None
        values = self.entries(block, MODEL_PARAMS, f"model '{block.name}'")
        if values is None:
            return None
        return ModelPlan(block.name, values["source"], values["input"], self.weights(block, values),
                         values["output"], _spans(block))

    def weights(self, block: ast.Block, values: dict) -> Path | HubWeights | None:
        """A checkpoint file, which must exist, or a Hub repository, fetched (or found in the cache) at build."""
        weights = values["weights"]
        if not isinstance(weights, str):
            return weights
        return self.existing_path(weights, block, "weights", want_dir=False)

    def teachers(self, blocks: list[ast.Block], model: ModelPlan | None) -> dict[str, ModelPlan]:
        """Model blocks after the first: models a pass names (`teacher = deit_base`), never compressed.
        They see the images the compressed model sees, so they take no `input` of their own."""
        teachers = {}
        for block in self.named(blocks, "model"):
            where = f"model '{block.name}'"
            if model is not None and block.name == model.name:
                self.report(f"duplicate model '{block.name}'", block.name_span)
                continue
            for entry in block.entries:
                if entry.key == "input":
                    self.report(f"{where} is a teacher: it sees the images of model '{model and model.name}' "
                                "and takes no input of its own", entry.span)
            values = self.entries(block, MODEL_PARAMS, where, skip=("input",))
            if values is not None and model is not None:
                teachers[block.name] = ModelPlan(block.name, values["source"], model.input,
                                                 self.weights(block, values), values["output"], _spans(block))
        used = {name for name, _ in self.model_refs}
        undefined = [(name, span) for name, span in self.model_refs if name not in teachers
                     and name not in ("original", "none", *self.misspelt.get("model", ()))]
        for name, span in undefined:
            self.report(f"undefined model '{name}'", span, did_you_mean(name, teachers) or
                        "a teacher is another model block: `model NAME { source = ... }`")
        for name in () if undefined else teachers.keys() - used:  # a misspelt use is reported once
            block = next(b for b in blocks if b.name == name)
            self.report(f"model '{name}' is never used: the first model block is the one compressed, and "
                        "later ones are teachers that a pass names", block.name_span)
        return teachers

    def data(self, block: ast.Block) -> DataPlan | None:
        values = self.entries(block, DATA_PARAMS, f"data '{block.name}'")
        if values is None:
            return None
        if (values["synthetic"] is None) == (values["images"] is None):
            self.report(f"data '{block.name}' needs exactly one of `synthetic = N` or `images = \"folder\"`",
                        block.name_span)
            return None
        problem = data_problem(values, {e.key: e.value.span for e in block.entries})
        if problem is not None:
            self.report(*problem)
            return None
        images = values["images"]
        if images is not None:
            images = self.existing_path(images, block, "images", want_dir=True)
        return DataPlan(block.name, values["synthetic"], images, values["seed"], values["limit"], values["split"],
                        values["part"], values["skip_bad"])

    def existing_path(self, raw: str, block: ast.Block, key: str, want_dir: bool) -> Path | None:
        path = (self.base / raw).resolve()
        ok = path.is_dir() if want_dir else path.is_file()
        if not ok:
            span = next(e.value.span for e in block.entries if e.key == key)
            what = "folder" if want_dir else "file"
            self.report(f"{key}: no such {what}: {path}", span, "paths are relative to the spec's folder")
        return path

    def evaluate(self, blocks: list[ast.Block]) -> EvaluatePlan | None:
        for extra in blocks[1:]:
            self.report("a spec has at most one evaluate block; this is a second one", extra.span)
        if not blocks:
            return None
        block = blocks[0]
        if block.name is not None:
            self.report("the evaluate block takes no name", block.name_span)
        values = self.entries(block, EVALUATE_PARAMS, "evaluate")
        return values and EvaluatePlan(values["data"], tuple(sorted(set(values["top"]))))

    def compress(self, blocks: list[ast.Block]) -> tuple[PassPlan, ...]:
        for extra in blocks[1:]:
            self.report("a spec has at most one compress block; this is a second one", extra.span)
        if not blocks:
            return ()
        block = blocks[0]
        if block.name is not None:
            self.report("the compress block takes no name", block.name_span)
        for entry in block.entries:
            self.report(f"'{entry.key}' is a setting, but compress holds passes, as in `head_prune {{ keep = 0.5 }}`",
                        entry.span)
        passes = []
        budgets = [n for n in block.nested if n.kind == BUDGET]
        self.budget = self.budget_of(budgets)
        for i, nested in enumerate(block.nested):
            if nested.kind == BUDGET:
                continue
            info = PASSES.get(nested.kind)
            if info is None:
                self.report(f"unknown pass '{nested.kind}'", nested.span,
                            did_you_mean(nested.kind, [*PASSES, BUDGET]))
                continue
            self.exclusions(nested, block.nested[:i])
            params = info.params
            searched = info.knob_keys if budgets else ()
            chosen = bool(searched) and not any(e.key in searched for e in nested.entries)
            if chosen:  # the budget's search fills these keys in
                params = tuple(replace(p, default=None, needed_when=()) if p.name in searched else p for p in params)
            values = self.entries(nested, params, f"pass '{nested.kind}'")
            if values is None:
                continue
            spans = {e.key: e.value.span for e in nested.entries}
            if info.check is not None:
                try:
                    info.check(values, spans)
                except Invalid as e:
                    self.report(e.message, e.span or nested.span, e.hint)
                    continue
            passes.append(PassPlan(nested.kind, values, spans))
            if chosen and not info.knob_timed and self.budget is not None and self.budget.params["latency"]:
                self.report(f"a latency budget cannot choose {nested.kind}'s {searched[0]} yet: the latency table "
                            "prices heads and MLP units, not tokens or removed sublayers; give them in the spec, "
                            "or budget macs instead", nested.span)
        if budgets and self.budget is not None:
            if not any(PASSES[p.name].searched(p.params) for p in passes):
                self.report("the budget has nothing to choose: leave `keep` out of head_prune, ffn_prune or "
                            "patch_slim (or the blocks out of block_skip) for the budget to choose them block by "
                            "block", budgets[0].span)
            if self.budget.params["judge"] == "recovery" and recovering(passes) is None:
                self.report("budget: judge = recovery needs a finetune after the passes it searches: that "
                            "finetune's recipe trains each candidate", self.budget.spans.get("judge"))
            for p in passes:
                info = PASSES[p.name]
                clash = info.searched(p.params) and info.knob.conflict(p.params)
                if clash:
                    self.report(clash[1], p.spans.get(clash[0]))
                if info.splits:
                    self.report(f"a budget cannot be combined with {p.name} yet: the budget is searched for one "
                                "model", budgets[0].span)
        return tuple(passes)

    def budget_target(self, plan: PassPlan, targets: tuple[TargetPlan, ...], names: list[str]) -> None:
        """A latency budget's `on` names a target of the spec (its table: measured here, over adb, or brought
        back from the board by `evc profile --results`)."""
        name, span = plan.params["on"], plan.spans.get("on")
        if name not in names and name not in self.misspelt.get("target", ()):
            self.report(f"budget: on: undefined target '{name}'", span, did_you_mean(name, names))

    def budget_of(self, blocks: list[ast.Block]) -> PassPlan | None:
        """The compress block's `budget { ... }`, checked; None without one or when it is wrong."""
        for extra in blocks[1:]:
            self.report("a compress block has at most one budget; this is a second one", extra.span)
        if not blocks:
            return None
        values = self.entries(blocks[0], BUDGET_PARAMS, "the budget")
        if values is None:
            return None
        try:
            check_budget(values, {e.key: e.value.span for e in blocks[0].entries}, blocks[0].span)
        except Invalid as e:
            self.report(e.message, e.span, e.hint)
            return None
        return PassPlan(BUDGET, values, {e.key: e.value.span for e in blocks[0].entries})

    def exclusions(self, later: ast.Block, earlier: tuple[ast.Block, ...]) -> None:
        """Report `later` once for each pass before it that it cannot share the compress block with."""
        first_of = {}
        for block in earlier:
            first_of.setdefault(block.kind, block)
        for kind, block in first_of.items():
            reason = exclusion(later.kind, kind)
            if reason is not None:
                self.report(f"`{later.kind}` cannot be combined with `{kind}` (line {block.span.line}): {reason}",
                            later.span)

    def target(self, block: ast.Block) -> TargetPlan | None:
        where = f"target '{block.name}'"
        given = {e.key: e for e in block.entries}
        device = self.registered(given.get("device"), DEVICES, "device", block, where)
        fmt = self.registered(given.get("format"), FORMATS, "format", block, where)
        if device is None or fmt is None:
            self.entries_known(block, _all_target_keys(), where)
            return None
        if fmt.name not in device.formats:
            self.report(f"device '{device.name}' does not take format '{fmt.name}'",
                        given["format"].value.span, f"it takes: {', '.join(device.formats)}")
            return None
        values = self.entries(block, TARGET_PARAMS + device.params + fmt.params, where, skip=("device", "format"))
        if values is None:
            return None
        spans = {e.key: e.value.span for e in block.entries}
        if fmt.check is not None:
            try:
                fmt.check(values, spans, device.name)
            except Invalid as e:
                self.report(f"{where}: {e.message}", e.span or block.name_span, e.hint)
                return None
        return TargetPlan(block.name, device.name, fmt.name, values, spans)

    def registered(self, entry: ast.Entry | None, registry: dict, key: str, block: ast.Block, where: str):
        if entry is None:
            if all(closest(e.key, _all_target_keys()) != key for e in block.entries if e.key != key):
                self.report(f"{where} is missing required key '{key}'", block.name_span or block.span,
                            f"known {key}s: {', '.join(sorted(registry))}")
            return None
        value = entry.value
        name = value.name if isinstance(value, ast.Ident) else value.value if isinstance(value, ast.String) else None
        if name is None:
            self.report(f"expected the name of a {key}, found {value.describe()}", value.span)
            return None
        if name not in registry:
            self.report(f"unknown {key} '{name}'", value.span,
                        did_you_mean(name, registry) or f"known {key}s: {', '.join(sorted(registry))}")
            return None
        return registry[name]

    def entries_known(self, block: ast.Block, keys: set[str], where: str) -> None:
        for entry in block.entries:
            if entry.key not in keys:
                self.report(f"unknown key '{entry.key}' in {where}", entry.span, did_you_mean(entry.key, keys))

    def entries(self, block: ast.Block, params: tuple[Param, ...], where: str, skip=()) -> dict | None:
        """Check a block's entries against its declared params; None if any was wrong."""
        for nested in block.nested:
            self.report(f"{where} cannot hold a block", nested.span)
        values, problems = check_entries(block.entries, params, where, block.name_span or block.span, skip)
        for problem in problems:
            self.report(problem.message, problem.span, problem.hint)
        self.data_refs += [(name.name, name.span) for name in named_data(block.entries, params)]
        self.model_refs += [(name.name, name.span) for name in named_data(block.entries, params, ModelRef)]
        return None if problems or block.nested else values


def _all_target_keys() -> set[str]:
    keys = {p.name for p in TARGET_PARAMS} | {p.name for d in DEVICES.values() for p in d.params}
    return keys | {p.name for f in FORMATS.values() for p in f.params}



def _spans(block: ast.Block) -> dict[str, Span]:
    """Each entry's value span by key; `name` is the block's name, where an error about the whole block points."""
    return {"name": block.name_span or block.span, **{e.key: e.value.span for e in block.entries}}
