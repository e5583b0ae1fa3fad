"""budget: say the budget, not the ratios. The compress block's passes take their per-layer `keep` from a search.

    compress {
        budget     { macs = 50%, data = calib }     # or macs = 600M, params = 8M, params = 60%
        head_prune { score = l1 }                   # no keep: the budget chooses it, block by block
        ffn_prune  { score = l1, round_to = 8 }
    }

head_prune and ffn_prune written without `keep` are searched; a pass that
writes its `keep` keeps it, and every other pass runs as written. The search
(after UVC's budgeted allocation and NViT's per-block sensitivity):

1. **Sensitivity.** Each searched pass is run alone on one block at a few
   widths (heads 1 at a time; units at 3/4, 1/2, 1/4 and the least), on the
   model the compress block starts from, its scores (taylor, activation)
   taken on the budget's `samples` images rather than the pass's whole
   `data`. Each pruned model's output is compared with the unpruned one's on
   those images: the KL divergence of its class probabilities. Its MACs and
   params are counted.
2. **Allocation.** Starting from every block whole, the step that costs the
   least divergence per MAC (or param) saved is taken, one head,
   `round_to` units, an eighth of the patches or one sublayer at a time (divergence interpolated between the measured
   widths, cost linear in the width), until the budget is met.
3. **Verification.** The saving needed is what the passes as written (every
   searched block whole) leave over the budget. The passes then run with the
   chosen widths and the result is counted; what is still over the budget
   (interactions between passes, rounding; token counts compound over the
   blocks) is taken by further steps, scaled by how far the summed estimates
   were from the count so far, then counted again. What a coarse step took
   beyond the budget is given back where the divergence falls most, as far
   as a count confirms.

4. **Judged after recovery** (evc.passes.recovery), when a finetune follows
   the searched passes (`judge = auto`, or `recovery`): the allocation above
   is one candidate among uniform ratios, depth tapers and learned gates,
   each trained briefly by that finetune's recipe and scored on images it
   held back. Uniform ratios are always judged and kept unless another
   candidate leads them by more than a bar of standard errors.

A pass that trains the model back (finetune) changes no count and is not run
while counting. The choice is deterministic: the same spec, weights and data
choose the same widths. It is recorded per pass, as the keys (`keep = [...]`, `attn = [...]`)
a spec can pin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction

from evc.context import PassContext
from evc.ir.summary import summary
from evc.passes.knob import keep_of
from evc.registry import PASSES

MAX_ROUNDS = 8  # verification rounds: each takes the steps the last count showed missing
REFILL_ROUNDS = 3  # counts spent giving back what overshot the budget
SLACK = 0.005  # of the budget: less left under it is not worth a count


def search(plan, program, before: dict, progress, budget_key: str, latency_table=None):
    """The passes with the keep the budget chose filled in, and the search's record; what a lock file beside
    the spec pinned for this budget, model and data, without searching. `latency_table(program)` gives the
    latency table of the budget's `on` target (the driver's: it is made by lowering and timing)."""
    from evc.context import Context
    from evc.errors import InputError

    program.require_structure("a budget")
    record = read_lock(plan.path, budget_key)
    if record is not None:
        return tuple(pinned(plan.passes, record)), {**record, "pinned": lock_path(plan.path).name}

    params = plan.budget.params
    metric = next(m for m in ("macs", "params", "latency") if params[m] is not None)
    table = None
    if metric == "latency":
        try:
            table = latency_table(program)
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
                                                 Probe(plan, pass_plan, program, images, progress))

    def count(program_) -> dict:
        total = summary(program_)["total"]
        return {**total, "latency": table.predict(program_.structure)} if table else total

    shown = f"{target:.3g}ms" if table else f"{target / 1e6:.4g}M"
    searcher = Search(program, list(plan.passes), metric, target, images, run_pass, count, probe_pass)
    with progress.stage(f"budget {metric} = {shown}: sensitivity of each block, then the search"):
        try:
            passes, _, record = searcher.run()
        except BudgetTooSmall as e:
            raise plan.error(plan.budget.spans.get(metric), f"budget: {e}") from None
    if judged_by_recovery(plan):
        from evc.passes.recovery import judged

        best, record["judge"] = judged(searcher, plan, program, progress)
        passes = best.passes
        record.update(reached=best.count, chosen=searcher.record_of(best.widths))
    else:
        record["judge"] = {"by": "divergence"}
    if table:
        record.update(on=params["on"], table=table.to_dict(), loaded_ms=whole)
    return tuple(passes), record


def judged_by_recovery(plan) -> bool:
    """Whether the budget judges its candidates after recovery: `judge = recovery`, or `auto` with a finetune
    after the searched passes."""
    from evc.spec.plan import recovering

    judge = plan.budget.params.get("judge", "auto")
    return judge == "recovery" or (judge == "auto" and recovering(plan.passes) is not None)


class Probe(PassContext):
    """A pass's context in a budget's trials: any data block it scores on reads as the budget's images."""

    def __init__(self, plan, pass_plan, original, images, progress):
        super().__init__(plan, pass_plan, original, "", None, progress)
        self._probe = images

    def images(self, data: str):
        return self._probe


@dataclass
class Group:
    """One block of one searched pass: the widths it may take, and what each costs."""

    pass_index: int  # in the compress block
    block: int
    full: int  # heads or units, as the model has them
    step: int  # one head, or round_to units
    least: int
    measured: dict[int, float] = field(default_factory=dict)  # width -> divergence (full -> 0)
    saved: float = 0.0  # of the metric, per head or unit removed
    width: int = 0  # as chosen

    def divergence(self, width: int) -> float:
        """Measured, or interpolated between the nearest measured widths."""
        points = sorted(self.measured.items())
        for (w0, d0), (w1, d1) in zip(points, points[1:]):
            if w0 <= width <= w1:
                return d0 + (d1 - d0) * (width - w0) / (w1 - w0)
        return points[0][1] if width < points[0][0] else points[-1][1]

    def next_width(self) -> int | None:
        if self.width <= self.least:
            return None
        return max(self.least, self.width - self.step)


@dataclass
class Search:
    """Everything the search needs from the driver: the model, the passes as written, and how to run them."""

    program: object  # the Program the compress block starts from
    passes: list  # PassPlans as written, keep None where searched
    metric: str
    target: float  # in the metric's own units
    images: object  # np.ndarray, the sensitivity's images
    run_pass: object  # (program, PassPlan) -> Program
    count: object  # (program) -> {"macs": ..., "params": ...}
    probe_pass: object = None  # run_pass for the sensitivity's trials, scoring on fewer images; run_pass if None
    groups: list[Group] = field(default_factory=list)

    def run(self):
        """The passes with their searched keep filled in, the compressed Program, and the record."""
        self.measure()
        floor = self.floor()
        if floor > self.target:
            raise BudgetTooSmall(self.metric, self.target, floor)
        written = self.count(self.compress(self.filled()))[self.metric]  # every searched block whole
        need = written - self.target
        self.allocate(need)
        rounds = []
        for _ in range(MAX_ROUNDS):
            passes = self.filled()
            compressed = self.compress(passes)
            total = self.count(compressed)[self.metric]
            rounds.append(total)
            if total <= self.target:
                passes, compressed, total = self.refill(passes, compressed, total, rounds)
                return passes, compressed, self.record(rounds, total)
            estimated, actual = self.estimated(), written - total
            need = estimated + (total - self.target) * (estimated / actual if actual > 0 else 1)  # the estimates'
            if not self.allocate(need):  # error so far taken to hold for what is still over (token passes compound)
                break
        raise BudgetTooSmall(self.metric, self.target, total)

    def measure(self) -> None:
        """Each searched pass alone on each block, at each measured width: divergence and saving."""
        import torch

        reference = torch.log_softmax(self.program.run(self.images), -1)
        full = self.count(self.program)
        for index, plan in enumerate(self.passes):
            if not PASSES[plan.name].searched(plan.params):
                continue
            knob = PASSES[plan.name].knob
            for block, width, step, least in knob.groups(self.program, plan):
                group = Group(index, block, width, step, least, {width: 0.0}, width=width)
                for level in knob.levels(width, step, least):
                    trial = self.set(plan, {block: keep_of(level, width)})
                    pruned = (self.probe_pass or self.run_pass)(self.program, trial)
                    logits = torch.log_softmax(pruned.run(self.images), -1)
                    group.measured[level] = float(torch.sum(reference.exp() * (reference - logits), -1).mean())
                    if level == least:
                        group.saved = (full[self.metric] - self.count(pruned)[self.metric]) / (width - least)
                self.groups.append(group)

    def floor(self) -> float:
        """The least the searched passes can reach: every block at its least width, the rest as written."""
        for group in self.groups:
            group.width = group.least
        total = self.count(self.compress(self.filled()))[self.metric]
        for group in self.groups:
            group.width = group.full
        return total

    def allocate(self, need: float) -> bool:
        """Take the cheapest steps (divergence per unit of the metric saved) until `need` is saved; False
        when no step is left."""
        saved = self.estimated()
        while saved < need:
            best, price = None, math.inf
            for group in self.groups:
                width = group.next_width()
                if width is None or group.saved <= 0:
                    continue
                cost = (group.divergence(width) - group.divergence(group.width)) / ((group.width - width) * group.saved)
                if cost < price:
                    best, price = group, cost
            if best is None:
                return False
            new = best.next_width()
            saved += (best.width - new) * best.saved
            best.width = new
        return True

    def refill(self, passes, compressed, total: float, rounds: list):
        """Give back what the last steps took beyond the budget (a coarse step, such as an eighth of the
        patches, can overshoot it): widen the blocks whose divergence falls most per unit, as far as the
        estimates fit the slack, and keep what the count confirms."""
        slack = self.target - total
        for _ in range(REFILL_ROUNDS):
            if slack < SLACK * self.target:
                break
            widened = self.widen(slack)
            if not widened:
                break
            trial = self.filled()
            program = self.compress(trial)
            count = self.count(program)[self.metric]
            rounds.append(count)
            if count <= self.target:
                passes, compressed, total, slack = trial, program, count, self.target - count
            else:  # the estimates were short: undo, and try half the slack
                for group, width in widened:
                    group.width = width
                slack /= 2
        return passes, compressed, total

    def widen(self, slack: float) -> list:
        """Widen blocks one step at a time, the most divergence removed per unit added first, while the
        estimated cost fits `slack`; (group, width before) for each step taken."""
        taken, tried = [], set()
        while True:
            best, value = None, -math.inf
            for group in self.groups:
                if group.width >= group.full or id(group) in tried or group.saved <= 0:
                    continue
                wider = min(group.full, group.width + group.step)
                gain = (group.divergence(group.width) - group.divergence(wider)) / ((wider - group.width) * group.saved)
                if gain > value:
                    best, value = group, gain
            if best is None:
                return taken
            wider = min(best.full, best.width + best.step)
            cost = (wider - best.width) * best.saved
            if cost > slack:
                tried.add(id(best))
                continue
            taken.append((best, best.width))
            best.width, slack = wider, slack - cost

    def estimated(self) -> float:
        """The saving the chosen widths add up to, each block's measured alone."""
        return sum((g.full - g.width) * g.saved for g in self.groups)

    def filled(self) -> list:
        """The passes as written, each searched one's keys filled with the chosen widths."""
        passes = list(self.passes)
        for index, shares in self.chosen().items():
            passes[index] = self.set(passes[index], shares)
        return passes

    def chosen(self) -> dict[int, dict[int, Fraction]]:
        """Per searched pass (by index), the kept share of each block it can narrow."""
        shares = {}
        for group in self.groups:
            shares.setdefault(group.pass_index, {})[group.block] = keep_of(group.width, group.full)
        return shares

    def set(self, plan, shares: dict[int, Fraction]):
        """`plan` with its searched keys set from per-block shares (1 where not given)."""
        values = PASSES[plan.name].knob.values(plan, shares, self.program.structure.depth)
        return replace(plan, params={**plan.params, **values})

    def set_widths(self, widths: dict[int, int]) -> None:
        """Every group at the width `widths` gives it (by the group's id)."""
        for group in self.groups:
            group.width = widths[id(group)]

    def compress(self, passes, probe: bool = False):
        """The passes run on the model, but those that train it back (finetune), which change no count; with
        `probe`, scoring on the budget's images (enough for a count)."""
        program = self.program
        for plan in passes:
            if not PASSES[plan.name].recovers:
                program = (self.probe_pass if probe and self.probe_pass else self.run_pass)(program, plan)
        return program

    def record_of(self, widths: dict[int, int] | None = None) -> list[dict]:
        """Each searched pass's keys for `widths` (the chosen ones when None), as a spec and a lock write them."""
        if widths is not None:
            self.set_widths(widths)
        depth = self.program.structure.depth
        return [{"pass": self.passes[index].name, "index": index,
                 **PASSES[self.passes[index].name].knob.record(self.passes[index], shares, depth)}
                for index, shares in sorted(self.chosen().items())]

    def record(self, rounds: list[float], total: float) -> dict:
        """What the manifest keeps: the budget, what was reached, and each searched pass's keep to pin."""
        return {"metric": self.metric, "target": self.target, "reached": total, "counts": rounds,
                "chosen": self.record_of(),
                "sensitivity": [{"pass": self.passes[g.pass_index].name, "block": g.block,
                                 "divergence": {str(w): round(d, 6) for w, d in sorted(g.measured.items())}}
                                for g in self.groups]}


def pinned(passes: list, record: dict) -> list:
    """The passes with the keys a record (a lock file's, or a manifest's) chose, without searching."""
    passes = list(passes)
    for entry in record["chosen"]:
        plan = passes[entry["index"]]
        passes[entry["index"]] = replace(plan, params={**plan.params, **PASSES[plan.name].knob.pinned(plan, entry)})
    return passes


def fragment(entry: dict) -> str:
    """A record's choice for one pass, as the keys to paste into its block in the spec."""
    return ", ".join(f"{k} = [{', '.join(map(str, v))}]" for k, v in entry.items() if k not in ("pass", "index"))


def lock_path(spec) -> object:
    """The lock file beside a spec: `deit.evc` -> `deit.evc.lock`."""
    return spec.with_name(spec.name + ".lock")


def write_lock(spec, key: str, record: dict) -> None:
    """Pin a search's choice beside the spec, as package managers do: a rebuild of the same spec, weights and
    data reads it instead of searching."""
    import json

    from evc.atomic import write_text

    write_text(lock_path(spec), json.dumps({"version": 1, "key": key, "budget": record}, indent=1) + "\n")


def read_lock(spec, key: str) -> dict | None:
    """The pinned record when a lock beside the spec was written for this very budget, model and data."""
    import json

    path = lock_path(spec)
    try:
        lock = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        from evc.errors import InputError

        raise InputError(f"{path}: cannot read the lock file ({e}); delete it to search again") from None
    return lock["budget"] if isinstance(lock, dict) and lock.get("key") == key else None


def target_of(amount: tuple[str, float], whole: float) -> float:
    """A budget's amount in the metric's units: a share of the model's own, or a count (or ms) as written."""
    kind, value = amount
    return value * whole if kind == "share" else value


class BudgetTooSmall(Exception):
    def __init__(self, metric: str, target: float, floor: float):
        self.metric, self.target, self.floor = metric, target, floor
        show = (lambda ms: f"{ms:.3g}ms") if metric == "latency" else human
        super().__init__(f"{metric} = {show(target)} cannot be met: the searched passes reach "
                         f"{show(floor)} at the least (every searched block at its least)")


def human(count: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.4g}{unit}"
    return f"{count:g}"
