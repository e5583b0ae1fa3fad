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
   least divergence per MAC (or param) saved is taken, one head or
   `round_to` units at a time (divergence interpolated between the measured
   widths, cost linear in the width), until the budget is met.
3. **Verification.** The saving needed is what the passes as written (every
   searched block whole) leave over the budget. The passes then run with the
   chosen widths and the result is counted; what is still over the budget
   (interactions between passes, rounding) is taken by further steps, then
   counted again.

The choice is deterministic: the same spec, weights and data choose the same
widths. It is recorded per pass, as the `keep` list a spec can pin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction

from evc.params import REQUIRED, Amount, DataRef, Int, Invalid, Param, PerLayer, TargetRef, Time

BUDGET = "budget"
SEARCHED = ("head_prune", "ffn_prune")  # the passes whose per-layer `keep` a budget chooses
METRICS = ("macs", "params", "latency")
PARAMS = (
    Param("macs", Amount(), None, "the compressed model's multiply-accumulates: a share of the model's own "
                                  "(50%) or a count (600M)", not_with=("params", "latency")),
    Param("params", Amount(), None, "the compressed model's parameters: a share (60%) or a count (8M)",
          not_with=("macs", "latency")),
    Param("latency", Time(), None, "the compressed model's time on the target `on`, as its latency table "
                                   "(evc profile) predicts it: a time (12ms) or a share (50%)",
          not_with=("macs", "params")),
    Param("on", TargetRef(), None, "the target whose runtime a latency budget is measured in (device = cpu)",
          only_with="latency"),
    Param("data", DataRef(), REQUIRED, "images each block's sensitivity is measured on"),
    Param("samples", Int(1), 32, "how many of those images"),
)
MAX_ROUNDS = 4  # verification rounds: each takes the steps the last count showed missing


def check(values: dict, spans: dict, at) -> None:
    """A budget names one of its metrics; a latency, the target it is timed on."""
    given = [m for m in METRICS if values.get(m) is not None]
    if not given:
        raise Invalid("a budget needs `macs`, `params` or `latency`, e.g. `budget { macs = 50%, data = calib }`", at)
    if values.get("latency") is not None and values.get("on") is None:
        raise Invalid("a latency budget needs `on`, the target it is timed on: `latency = 12ms, on = cpu`",
                      spans.get("latency", at))


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


def levels(full: int, step: int, least: int) -> list[int]:
    """The widths sensitivity is measured at: for heads, each; for units, 3/4, 1/2, 1/4 and the least."""
    if step == 1 and full <= 16:
        return list(range(least, full))
    shares = [round(full * s / step) * step for s in (0.75, 0.5, 0.25)]
    return sorted({max(least, min(full - step, w)) for w in shares} | {least})


def keep_of(width: int, full: int) -> Fraction:
    """The share that head_prune and ffn_prune turn back into exactly `width`."""
    return Fraction(width, full)


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
                return passes, compressed, self.record(rounds, total)
            need += total - self.target
            if not self.allocate(need):
                break
        raise BudgetTooSmall(self.metric, self.target, total)

    def measure(self) -> None:
        """Each searched pass alone on each block, at each measured width: divergence and saving."""
        import torch

        reference = torch.log_softmax(self.program.run(self.images), -1)
        full = self.count(self.program)
        for index, plan in enumerate(self.passes):
            if plan.name not in SEARCHED or plan.params.get("keep") is not None:
                continue
            for block, (width, step, least) in widths(self.program, plan):
                group = Group(index, block, width, step, least, {width: 0.0}, width=width)
                for level in levels(width, step, least):
                    trial = self.one_block(plan, block, keep_of(level, width))
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
        saved = sum((g.full - g.width) * g.saved for g in self.groups)
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

    def filled(self) -> list:
        """The passes as written, each searched keep filled with the chosen widths."""
        passes = list(self.passes)
        for index in {g.pass_index for g in self.groups}:
            plan = passes[index]
            depth = self.program.structure.depth
            keep = [Fraction(1)] * depth
            for group in self.groups:
                if group.pass_index == index:
                    keep[group.block] = keep_of(group.width, group.full)
            passes[index] = replace(plan, params={**plan.params, "keep": PerLayer(tuple(map(float, keep)), None)})
        return passes

    def compress(self, passes):
        program = self.program
        for plan in passes:
            program = self.run_pass(program, plan)
        return program

    def one_block(self, plan, block: int, keep: Fraction):
        depth = self.program.structure.depth
        values = tuple(float(keep) if i == block else 1.0 for i in range(depth))
        return replace(plan, params={**plan.params, "keep": PerLayer(values, None)})

    def record(self, rounds: list[float], total: float) -> dict:
        """What the manifest keeps: the budget, what was reached, and each searched pass's keep to pin."""
        chosen = {}
        for group in self.groups:
            entry = chosen.setdefault(group.pass_index, {"pass": self.passes[group.pass_index].name,
                                                         "index": group.pass_index,
                                                         "keep": ["1"] * self.program.structure.depth})
            entry["keep"][group.block] = fraction_text(keep_of(group.width, group.full))
        return {"metric": self.metric, "target": self.target, "reached": total, "counts": rounds,
                "chosen": [chosen[k] for k in sorted(chosen)],
                "sensitivity": [{"pass": self.passes[g.pass_index].name, "block": g.block,
                                 "divergence": {str(w): round(d, 6) for w, d in sorted(g.measured.items())}}
                                for g in self.groups]}


def pinned(passes: list, record: dict) -> list:
    """The passes with the keep a record (a lock file's, or a manifest's) chose, without searching."""
    passes = list(passes)
    for entry in record["chosen"]:
        plan = passes[entry["index"]]
        keep = tuple(float(Fraction(k)) for k in entry["keep"])
        passes[entry["index"]] = replace(plan, params={**plan.params, "keep": PerLayer(keep, None)})
    return passes


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


def widths(program, plan) -> list[tuple[int, tuple[int, int, int]]]:
    """(block, (full width, step, least)) for each block a searched pass can narrow."""
    blocks = program.structure.blocks
    if plan.name == "head_prune":
        least = plan.params["min_heads"]
        return [(b.index, (b.attn.num_heads, 1, min(least, b.attn.num_heads))) for b in blocks
                if b.attn is not None and b.attn.num_heads > least]
    step = plan.params["round_to"]
    return [(b.index, (b.mlp.hidden, step, step)) for b in blocks if b.mlp is not None and b.mlp.hidden > step]


def fraction_text(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def target_of(amount: tuple[str, float], whole: float) -> float:
    """A budget's amount in the metric's units: a share of the model's own, or a count (or ms) as written."""
    kind, value = amount
    return value * whole if kind == "share" else value


class BudgetTooSmall(Exception):
    def __init__(self, metric: str, target: float, floor: float):
        self.metric, self.target, self.floor = metric, target, floor
        show = (lambda ms: f"{ms:.3g}ms") if metric == "latency" else human
        super().__init__(f"{metric} = {show(target)} cannot be met: the searched passes reach "
                         f"{show(floor)} at the least (every block at its fewest heads and units)")


def human(count: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.4g}{unit}"
    return f"{count:g}"
