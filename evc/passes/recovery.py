"""A budget judged after recovery: candidate allocations, each trained briefly by the finetune that follows
the searched passes and scored on images that training held back.

One-shot sensitivity (evc.passes.budget.Search) ranks blocks by what removing them costs before any
training; which allocation recovers best under finetuning is another question. UVC, NViT and Minitron judge
candidates closer to the final model. Here every candidate meets the budget by a count:

    uniform        every head and unit group at one share of its width: the largest share within the budget
    sensitivity    the one-shot divergence allocation
    heads 2/3,     with two passes of ratios (heads and units): the coarser one (heads) at each share its
      rest uniform   blocks can take alike (at most 4), the other's one share the largest within the budget
    early wider,   the share falls (rises) linearly over the depth, the first (last) block keeping half as
    late wider       much again as the middle one
    learned,       gates on every head and unit, trained under the budget with the weights frozen, or
    learned with     with them (UVC's learned allocation; evc.passes.learned)
      weights

and each is given `steps` steps of the finetune's own recipe (its teacher, loss, batch and learning rate;
the warm-up and cosine decay shortened alike), then judged on labelled images the model as loaded never
trained on: the budget's `judge_data`, else the evaluate block's data. Without either, it trains on the
finetune's images less a held-back share of each class and is judged on that share, which favours the
allocations that keep the model's own outputs on images it may have learnt by heart.

The candidates are ranked by the images they class right (by the recipe's loss on unlabelled images), the
loss breaking ties. A few images apart on a few hundred is chance, so the search keeps uniform ratios unless
another allocation leads them by more than `bar(k)` standard errors of the paired difference over the judged
images. The baseline is the best ranked of the candidates alike in every block (`uniform`, and a coarse
pass's shares with the rest uniform); the winner is the best ranked of the k others that leads it by that
much, else the baseline. One standard error is the bar for one rival; for k, the bar that one of k rivals
no better than uniform ratios clears as rarely (16%: Bonferroni's correction), 2.0 for 7. So the search
never chooses an allocation that measured worse than uniform ratios there, nor one that measured better by
a chance k draws make likely.

With `refine`, a second round: the first round's baseline (the best uniform ratios) and its neighbours,
each with one block's heads one fewer or one more and the MLPs at one share again, bisected to the budget,
are trained for longer (`refine` steps; auto: 4 × `steps`) and judged as before, the baseline against its
neighbours (and the first round's winner, when it was not the baseline). Uniform ratios step a whole head
in every block at once; a neighbour takes the shares between. The winner of the last round is then trained
by the finetune as written, like any model the passes leave.

Candidates are trained in parallel worker processes where the cores allow (one per 2 cores), or one at a
time on the GPU when the finetune trains there.
"""

from __future__ import annotations

import math
import os
import pickle
import time
from dataclasses import dataclass, replace

from evc.registry import PASSES

TAPER = 0.5  # of the middle block's share: what the first (last) block keeps more in a tapered candidate
BISECTIONS = 12
LEVELS = 4  # shares of the coarsest pass tried with the rest uniform


@dataclass
class Candidate:
    name: str
    widths: dict  # id(Group) -> width
    alike: bool = False  # every block at one share of each pass: uniform ratios
    passes: list | None = None  # filled PassPlans
    program: object = None  # the passes' Program, as the build would make it
    count: float = 0.0  # of the budget's metric, counted
    loss: float | None = None  # on the judged images, after recovery
    top1: float | None = None
    scores: object = None  # each judged image's (numpy): 1 right, 0 wrong (labelled), else minus its loss
    seconds: float = 0.0

    def rank(self, uniform) -> tuple:
        """Sorts the best first: the most judged images right (when labelled), then the least loss; uniform
        first of equals."""
        return (-self.top1 if self.top1 is not None else 0.0, self.loss, self is not uniform)

    def lead(self, other) -> tuple[float, float]:
        """Its mean lead over `other` on the judged images (top-1, or loss when unlabelled), and the
        standard error of that mean."""
        d = self.scores - other.scores
        return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0

    def row(self, search, baseline) -> dict:
        """What the manifest keeps of a candidate."""
        lead, error = self.lead(baseline) if self.scores is not None else (None, None)
        return {"name": self.name, "count": self.count, "loss": _round(self.loss), "top1": _round(self.top1),
                "lead": _round(lead), "se": _round(error), "seconds": round(self.seconds, 1),
                "chosen": search.record_of(self.widths)}


def bar(rivals: int) -> float:
    """The standard errors by which one of `rivals` allocations must lead uniform ratios: as unlikely to be
    cleared by chance by one of them as one standard error is by one (the module's docstring)."""
    from statistics import NormalDist

    chance = 1 - NormalDist().cdf(1.0)
    return NormalDist().inv_cdf(1 - chance / max(1, rivals))


def winner(candidates: list[Candidate], uniform: Candidate) -> tuple[Candidate, Candidate, float]:
    """(the winner, the baseline, the bar) of the judged candidates: the baseline the best ranked alike in
    every block, the winner the best ranked of the rest that leads it by more than `bar` standard errors,
    else the baseline."""
    ranked = sorted((c for c in candidates if c.loss is not None), key=lambda c: c.rank(uniform))
    baseline = next((c for c in ranked if c.alike), ranked[0])  # none alike: uniform could not be drawn
    needed = bar(sum(not c.alike for c in ranked))
    for candidate in ranked:
        if candidate is baseline:
            break
        lead, error = candidate.lead(baseline)
        if lead > needed * error:
            return candidate, baseline, needed
    return baseline, baseline, needed


def judged(search, plan, program, progress):
    """The candidates judged after recovery, and the winner's filled passes and record entries."""
    from evc.context import PassContext
    from evc.spec.plan import recovering

    params = plan.budget.params
    index, finetune = recovering(plan.passes)
    started = time.monotonic()
    with progress.stage("budget: candidate allocations, each within the budget"):
        candidates = _candidates(search)
    ctx = PassContext(plan, finetune, program, "", None, progress)
    plugin = PASSES[finetune.name].plugin
    uniform = candidates[0]
    with progress.stage(f"budget: {finetune.name}'s recipe, fitted to the uniform candidate"):
        run = plugin.recovery(uniform.program, finetune.params, ctx)
    steps = params["steps"] if params["steps"] != "auto" else _quarter(run, len(run.images))
    split = _split(plan, run, ctx)
    limit = params["time"]
    if limit is None or time.monotonic() - started < limit:
        with progress.stage("budget: gates on every head and unit, trained under the budget"):
            candidates += _learned(search, run, split, steps, candidates)
    workers = _workers(params["workers"], run.recipe.device, len(candidates))
    with progress.stage(f"budget: judge {len(candidates)} candidates after {steps} steps of {finetune.name}, on "
                        f"{split.count} {split.where} ({workers} at a time)"):
        _train_all(candidates, run, split, steps, workers, started, limit, progress)
    best, baseline, needed = winner(candidates, uniform)
    rounds = [_round_record(search, steps, candidates, best, baseline, needed)]
    if params["refine"] != "none" and (limit is None or time.monotonic() - started < limit):
        longer = params["refine"] if params["refine"] != "auto" else 4 * steps
        again = [baseline] if best is baseline else [baseline, best]
        near = _neighbours(search, baseline)
        finalists = [replace(c, loss=None, top1=None, scores=None, seconds=0.0) for c in again] + near
        with progress.stage(f"budget: refine: {' and '.join(c.name for c in again)} and {len(near)} neighbours, "
                            f"each after {longer} steps"):
            _train_all(finalists, run, split, longer, workers, started, limit, progress)
        best, baseline, needed = winner(finalists, finalists[0])
        rounds.append(_round_record(search, longer, finalists, best, baseline, needed))
    return best, {"by": "recovery", "pass": finetune.name, "index": index, "on": split.where,
                  "images": split.count, "lr": run.recipe.lr, "workers": workers,
                  "seconds": round(time.monotonic() - started, 1),
                  "measure": "top1" if uniform.top1 is not None else "loss",
                  **rounds[-1], "earlier_rounds": rounds[:-1]}


def _round_record(search, steps: int, candidates: list[Candidate], best, baseline, needed: float) -> dict:
    """What the manifest keeps of one round of judging."""
    return {"steps": steps, "winner": best.name, "baseline": baseline.name, "bar": round(needed, 3),
            "candidates": [c.row(search, baseline) for c in candidates],
            "left_out": [c.name for c in candidates if c.loss is None]}


def _split(plan, run, ctx) -> Split:
    """What candidates train and are judged on: all the finetune's images and a block the model never
    trained on (the budget's `judge_data`, else the evaluate block's, when labelled), or the finetune's
    images less `holdout` of each class."""
    params = plan.budget.params
    for name in (params.get("judge_data"), plan.evaluate and plan.evaluate.data):
        if name:
            images = ctx.dataset(name)
            if images.classes is not None:
                return Split(list(range(len(run.images))), [], images, f"images of data '{name}'")
    split = Split.of(run, params["holdout"])
    split.where = "images held back from the finetune's"
    return split


def _candidates(search) -> list[Candidate]:
    """Uniform first, the sensitivity allocation second, then the rest; each counted within the budget, and
    none twice."""
    from fractions import Fraction

    sensitivity = {id(g): g.width for g in search.groups}  # as Search.run left them
    ratio = _ratio_groups(search)
    shapes = [("uniform", lambda g, r: r, True)]  # (name, share of group g at r, alike in every block)
    coarse = _coarse(ratio)
    if len({g.pass_index for g in ratio}) > 1:  # one share per pass: the coarsest (heads) at each, the rest bisected
        name = search.passes[coarse].name
        for share in _levels([g for g in ratio if g.pass_index == coarse]):
            shapes.append((f"{name} {Fraction(share).limit_denominator(64)}, rest uniform",
                           lambda g, r, i=coarse, s=share: s if g.pass_index == i else r, True))
    depth = search.program.structure.depth

    def tapered(sign):
        return lambda g, r: r * (1 + sign * TAPER * (1 - 2 * g.block / max(1, depth - 1)))

    shapes += [("early wider", tapered(1), False), ("late wider", tapered(-1), False)]
    made = []
    for name, shape, alike in shapes:
        widths = _bisected(search, ratio, shape)
        if widths is not None:
            made.append(Candidate(name, widths, alike=alike))
        if name == "uniform":
            made.append(Candidate("sensitivity", sensitivity))
    unique = _new(made, [])
    for candidate in unique:
        _compressed(search, candidate)
    return unique


def _ratio_groups(search) -> list:
    """The groups of the searched passes that keep a share of their width (heads, units)."""
    return [g for g in search.groups if PASSES[search.passes[g.pass_index].name].knob.ratio]


def _coarse(ratio) -> int | None:
    """The pass of the fewest steps per block (heads rather than units): None when none keeps a share."""
    return min(sorted({g.pass_index for g in ratio}), default=None,
               key=lambda i: min((g.full - g.least) // g.step for g in ratio if g.pass_index == i))


def _neighbours(search, baseline: Candidate) -> list[Candidate]:
    """The baseline with one block's coarse pass (heads) a step narrower or wider, the other passes at one
    share again, bisected to the budget: whether one head more or fewer somewhere buys more than the MLP
    units it costs (or frees) in every block. None twice, nor the baseline."""
    ratio = _ratio_groups(search)
    coarse = _coarse(ratio)
    if coarse is None:
        return []
    rest = [g for g in ratio if g.pass_index != coarse]
    kept = {id(g): baseline.widths[id(g)] for g in ratio if g.pass_index == coarse}
    made = []
    for group in (g for g in ratio if g.pass_index == coarse):
        for step in (-group.step, group.step):
            width = kept[id(group)] + step
            if group.least <= width <= group.full:
                widths = _bisected(search, rest, lambda g, r: r, kept | {id(group): width})
                if widths is not None:
                    made.append(Candidate(f"{search.passes[coarse].name} block {group.block} {step:+d}", widths))
    new = _new(made, [baseline])
    for candidate in new:
        _compressed(search, candidate)
    return new


def _learned(search, run, split, steps: int, candidates) -> list[Candidate]:
    """The learned candidates, their gates trained for `steps` judged steps' worth, compressed and counted,
    unless a searched pass takes no gates; none that repeats another."""
    from evc.passes.learned import gate_steps, learned_shares

    made = []
    for name, joint in (("learned", False), ("learned with weights", True)):
        learned = learned_shares(search, run, split.train, joint, gate_steps(steps))
        if learned is None:
            return []
        widths = _bisected(search, *learned)
        if widths is not None:
            made.append(Candidate(name, widths))
    new = _new(made, candidates)
    for candidate in new:
        _compressed(search, candidate)
    return new


def _new(made: list[Candidate], known: list[Candidate]) -> list[Candidate]:
    """The candidates of `made` whose widths neither `known` nor an earlier one of `made` has."""
    seen, unique = {tuple(sorted(c.widths.items())) for c in known}, []
    for candidate in made:
        key = tuple(sorted(candidate.widths.items()))
        if key not in seen:
            seen.add(key)
            unique.append(candidate)
    return unique


def _compressed(search, candidate: Candidate) -> None:
    """The candidate's passes filled, run and counted."""
    search.set_widths(candidate.widths)
    candidate.passes = search.filled()
    candidate.program = search.compress(candidate.passes)
    candidate.count = search.count(candidate.program)[search.metric]


def _levels(groups) -> list[float]:
    """The shares every group of one pass can take alike, whole among them: at most LEVELS, spread evenly."""
    g = groups[0]
    shares = [w / g.full for w in range(g.least, g.full + 1, g.step)]
    if len(shares) > LEVELS:
        shares = [shares[round(k * (len(shares) - 1) / (LEVELS - 1))] for k in range(LEVELS)]
    return shares


def _bisected(search, groups, shape, fixed: dict | None = None) -> dict | None:
    """Widths with each group at `shape(group, r)` of its own, for the largest r within the budget (by a
    count); the other groups at their `fixed` width, else whole. None when even r = 0 is over it."""
    whole = {id(g): g.full for g in search.groups} | (fixed or {})

    def widths(r):
        chosen = dict(whole)
        for g in groups:
            share = min(1.0, max(0.0, shape(g, r)))
            chosen[id(g)] = max(g.least, min(g.full, g.step * round(share * g.full / g.step)))
        return chosen

    def fits(r):
        search.set_widths(widths(r))
        return search.count(search.compress(search.filled(), probe=True))[search.metric] <= search.target

    if not fits(0.0):
        return None
    low, high = 0.0, 1.0
    for _ in range(BISECTIONS):
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return widths(low)


@dataclass
class Split:
    """What a candidate trains on (indices of the finetune's images) and is judged on: the finetune's images
    at `held`, or another data block's (`judged_on`)."""

    train: list[int]
    held: list[int]
    judged_on: object = None  # a Dataset of labelled images, when not the held-back ones
    where: str = ""  # what the judged images are, in words

    @staticmethod
    def of(run, share: float) -> Split:
        """The finetune's images less `share` of each class (seeded by its recipe), and that share."""
        import numpy as np

        labels = np.asarray(getattr(run.images, "labels", [-1] * len(run.images)))
        rng = np.random.default_rng(run.recipe.seed)
        train, held = [], []
        for label in np.unique(labels):
            index = rng.permutation(np.flatnonzero(labels == label))
            cut = max(1, round(share * len(index))) if len(index) > 1 else 0
            held += index[:cut].tolist()
            train += index[cut:].tolist()
        return Split(sorted(train), sorted(held))

    @property
    def count(self) -> int:
        return len(self.judged_on) if self.judged_on is not None else len(self.held)

    def judged(self, run):
        """The judged images, with the eval transform."""
        from torch.utils.data import Subset

        if self.judged_on is not None:
            return self.judged_on
        return Subset(run.plain if run.plain is not None else run.images, self.held)


def _quarter(run, images: int) -> int:
    """A quarter of the finetune's own steps."""
    return max(1, round(run.recipe.epochs * math.ceil(images / run.recipe.batch) / 4))


def _workers(asked, device: str, candidates: int) -> int:
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return 1
    if asked == "auto":
        asked = max(1, len(os.sched_getaffinity(0)) // 2)
    return max(1, min(asked, candidates))


@dataclass
class Job:
    """One candidate's recovery, as a worker process receives it."""

    graph: object
    run: object
    split: Split
    steps: int
    threads: int = 0  # torch's threads in a worker; 0: leave as is


def recovered(job: Job) -> dict:
    """Train `job.graph` for `job.steps` steps of the run's recipe on the split's training images and score it
    on its judged ones: {"loss", "top1", "scores" (each image's, as Candidate's), "seconds"}. Runs in a worker
    process or in this one."""
    import torch
    from torch.utils.data import Subset

    from evc.passes.train import distill, held_out_scores

    if job.threads:
        torch.set_num_threads(job.threads)
    start = time.perf_counter()
    recipe, train = job.run.recipe, job.split.train
    per_epoch = math.ceil(len(train) / recipe.batch)
    if job.steps <= per_epoch:  # one epoch over as many images as the steps take
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(recipe.seed)).tolist()
        train, epochs = sorted(train[i] for i in order[:job.steps * recipe.batch]), 1
    else:
        epochs = round(job.steps / per_epoch)
    warmup = recipe.warmup_epochs / recipe.epochs * epochs  # the same share of the run
    short = replace(recipe, epochs=epochs, warmup_epochs=warmup)
    result = distill(job.graph, job.run.teacher, Subset(job.run.images, train), short, progress=_silent)
    judged = job.split.judged(job.run)
    labelled = job.split.judged_on is not None or getattr(job.run.images, "classes", None) is not None
    losses, right = held_out_scores(result.student.eval(), job.run.teacher, judged, short, labelled=labelled)
    scores = right.double() if right is not None else -losses.double()
    return {"loss": float(losses.mean()), "top1": float(right.double().mean()) if right is not None else None,
            "scores": scores.numpy(), "seconds": time.perf_counter() - start}


def _silent(*_):
    pass


def _train_all(candidates, run, split, steps, workers, started, limit, progress) -> None:
    """Each candidate's recovery, `workers` at a time; past `limit` seconds from `started`, no candidate
    after the first two (uniform and the sensitivity allocation) is started."""
    jobs = [Job(c.program.graph, run, split, steps) for c in candidates]
    pool = _pool(workers, jobs, progress) if workers > 1 else None
    try:
        pending, running = list(range(len(jobs))), {}
        while pending or running:
            while pending and len(running) < (workers if pool else 1):
                k = pending.pop(0)
                if limit is not None and k >= 2 and time.monotonic() - started > limit:
                    progress.warn(f"budget: time = {limit:g}s is spent: candidate '{candidates[k].name}' is not "
                                  "judged")
                    continue
                running[k] = pool.submit(recovered, jobs[k]) if pool else None
            if not running:
                break
            if pool:
                from concurrent.futures import FIRST_COMPLETED, wait

                done, _ = wait(running.values(), return_when=FIRST_COMPLETED)
                finished = [(k, f.result()) for k, f in list(running.items()) if f in done]
            else:
                k = next(iter(running))
                finished = [(k, recovered(jobs[k]))]
            for k, score in finished:
                del running[k]
                candidate = candidates[k]
                candidate.loss, candidate.top1, candidate.scores = score["loss"], score["top1"], score["scores"]
                candidate.seconds = score["seconds"]
                top = f"top-1 {candidate.top1:.2%}, " if candidate.top1 is not None else ""
                progress.note(f"  {candidate.name}: {top}loss {candidate.loss:.4f} ({candidate.seconds:.0f}s)")
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


def _pool(workers: int, jobs: list, progress):
    """A pool of spawned worker processes, each with its share of the cores."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    for job in jobs:
        job.threads = threads
    try:
        pickle.dumps(jobs[0])  # the candidates are one model's classes, cut
    except Exception as e:  # a model of the user's own that only this process can import
        progress.warn(f"budget: the candidates cannot be sent to worker processes ({type(e).__name__}: {e}); "
                      "judging them one at a time here")
        return None
    return ProcessPoolExecutor(workers, mp_context=get_context("spawn"))


def _round(value):
    return None if value is None else round(value, 6)
