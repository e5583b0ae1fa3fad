"""Latency lookup tables: what a block costs on a target, by heads and MLP width, measured in its runtime.

    evc profile specs/deit_tiny_x5.evc --target cpu       # the table, printed and cached
    budget { latency = 12ms, on = cpu, data = calib }     # the search reads it

After NViT's per-block latency table. The model is lowered as the target
lowers it at each point of a grid, every block alike (heads 1 to H, or five
levels of them; MLP units at 1/8, 1/4, 1/2, 3/4 and all of them, rounded to 8),
and once with one block left (which, with the whole, gives what the stem,
the head and the runtime's call cost: a model of no block would not lower).
Each is timed in the target's runtime here, taking turns run by run, at the
target's first thread count. A block's cost at a point is the whole model's
time there, less the blockless time, over the depth; the
cost between points is interpolated (bilinear in heads and units), and a
model's predicted time is the blockless time plus its blocks' costs.

Measured here: targets whose device is this machine (`device = cpu`, ONNX
Runtime or LiteRT). The blocks must be alike (a plain ViT or DeiT): a model
whose stages differ in width needs a table per stage, and a block left with
attention or an MLP alone (block_skip) a table of its own, which evc does
not make yet.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from evc.errors import InputError

UNIT_SHARES = (0.125, 0.25, 0.5, 0.75, 1.0)
ROUND_TO = 8


@dataclass(frozen=True)
class Table:
    """One block's milliseconds at each (heads, units) of a grid, and the blockless model's."""

    target: str
    runtime: str
    threads: int
    depth: int
    heads: tuple[int, ...]
    units: tuple[int, ...]
    base_ms: float  # every block removed: the stem, the head, the runtime's cost per call
    block_ms: tuple[tuple[float, ...], ...]  # [heads level][units level]

    def block(self, heads: int, units: int) -> float:
        """One block's ms at `heads` and `units`, interpolated between the measured points."""
        (h0, h1), th = _between(self.heads, heads)
        (u0, u1), tu = _between(self.units, units)
        row = [(1 - tu) * self.block_ms[h][u0] + tu * self.block_ms[h][u1] for h in (h0, h1)]
        return (1 - th) * row[0] + th * row[1]

    def predict(self, structure) -> float:
        """The model's ms: the blockless model's, plus each block's at its heads and units."""
        total = self.base_ms
        for b in structure.blocks:
            if b.attn is None or b.mlp is None:
                raise InputError(f"block {b.index} has lost its {'attention' if b.attn is None else 'MLP'} "
                                 "(block_skip): a latency table has no entry for half a block yet; give the "
                                 "budget in macs or params")
            total += self.block(b.attn.num_heads, b.mlp.hidden)
        return total

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Table:
        return cls(**{**data, "heads": tuple(data["heads"]), "units": tuple(data["units"]),
                      "block_ms": tuple(tuple(row) for row in data["block_ms"])})


def _between(levels: tuple[int, ...], x: int) -> tuple[tuple[int, int], float]:
    """The indices of the measured levels around x, and x's place between them (clamped at the ends)."""
    if x <= levels[0]:
        return (0, 0), 0.0
    for i in range(len(levels) - 1):
        if x <= levels[i + 1]:
            return (i, i + 1), (x - levels[i]) / (levels[i + 1] - levels[i])
    return (len(levels) - 1, len(levels) - 1), 0.0


def grid(structure) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The heads and units a table is measured at, for a model whose blocks are alike."""
    blocks = [b for b in structure.blocks if b.attn is not None and b.mlp is not None]
    shapes = {(b.attn.num_heads, b.mlp.hidden) for b in blocks}
    if len(shapes) != 1 or len(blocks) != len(structure.blocks):
        raise InputError("a latency table is measured on a model whose blocks are alike, each with attention and "
                         f"an MLP of the same widths; this one has blocks of {len(shapes)} shapes (heads, MLP "
                         "units): give the budget in macs or params instead")
    ((heads, units),) = shapes
    head_levels = list(range(1, heads + 1)) if heads <= 6 else sorted({1, *(round(heads * s) for s in
                                                                              (0.25, 0.5, 0.75)), heads})
    unit_levels = sorted({min(units, max(ROUND_TO, round(units * s / ROUND_TO) * ROUND_TO)) for s in UNIT_SHARES})
    return tuple(head_levels), tuple(unit_levels)


def measure(program, lower, session, threads: int, runs: int, warmups: int, alongside: dict | None = None):
    """The table for `program`: `lower(program, folder)` writes the target's artifact and returns its path,
    `session(path, threads)` runs it. Models `alongside` (name: Program) are timed in the same turns, and
    their ms returned with the table: (table, {name: ms})."""
    from evc.passes.block_skip import BlockSkip
    from evc.passes.ffn_prune import FfnPrune
    from evc.passes.head_prune import HeadPrune

    structure = program.structure
    heads, units = grid(structure)
    full_heads, full_units = heads[-1], units[-1]
    depth = len(structure.blocks)
    models = {}
    with tempfile.TemporaryDirectory() as folder:
        for h in heads:
            narrow = HeadPrune().run(program, dict(keep=h / full_heads, score="l1", scope="layer", min_heads=1,
                                                   data=None), _Uniform(h / full_heads))
            for u in units:
                shaped = FfnPrune().run(narrow, dict(keep=u / full_units, score="l1", round_to=ROUND_TO, data=None),
                                        _Uniform(u / full_units))
                models[(h, u)] = shaped
        # A model of no block does not lower (nothing is left to recognise), so one of one block stands in:
        # base = T(one) - (T(all) - T(one)) / (depth - 1).
        models["one"] = BlockSkip().run(program, dict(attn=(), mlp=(), blocks=tuple(range(1, depth)), count=None,
                                                      part="block", score="residual", data=None), _Uniform(1.0))
        models.update({("alongside", name): model for name, model in (alongside or {}).items()})
        runs_ = {}
        for i, (key, model) in enumerate(models.items()):
            target = Path(folder) / str(i)
            target.mkdir()
            runs_[key] = session(lower(model, target), threads)
        feed = np.random.default_rng(0).standard_normal(program.input.shape, dtype=np.float32)
        times = interleaved(runs_, feed, runs, warmups)
    whole = times[(full_heads, full_units)]
    base = times["one"] - (whole - times["one"]) / (depth - 1)
    block_ms = tuple(tuple(max(0.0, (times[(h, u)] - base) / depth) for u in units) for h in heads)
    table = Table("", "", threads, depth, heads, units, base, block_ms)
    return table, {key[1]: ms for key, ms in times.items() if key[0] == "alongside"}


class _Uniform:
    """What a pass asks of its context, answered the same for every block."""

    def __init__(self, keep: float):
        self.keep = keep

    def per_layer(self, key, depth):
        return (self.keep,) * depth

    def images(self, name):
        return None

    def report(self, key, value):
        pass

    def error(self, key, message):
        return InputError(f"profile: {key}: {message}")


def interleaved(runs: dict, feed: np.ndarray, count: int, warmups: int) -> dict:
    """Median ms of each run(feed), all taking turns run by run, so the machine's noise falls on all alike;
    the turns' order is shuffled (seeded) each round, so that noise with a period cannot fall on one alone."""
    for _ in range(warmups):
        for run in runs.values():
            run(feed)
    keys, order = list(runs), np.random.default_rng(0)
    times = {key: [] for key in keys}
    for _ in range(count):
        for i in order.permutation(len(keys)):
            start = time.perf_counter()
            runs[keys[i]](feed)
            times[keys[i]].append((time.perf_counter() - start) * 1e3)
    return {key: statistics.median(t) for key, t in times.items()}


def thread_count(value) -> int:
    return len(os.sched_getaffinity(0)) if value == "all" else int(value)


def table_for(plan, target_name: str, program, cache, load_key: str, progress) -> Table:
    """The latency table of `program` on the spec's target `target_name`, from the cache when it is there."""
    import json

    from evc.context import Context
    from evc.keys import library_versions, stage_key
    from evc.registry import FORMATS, Runtime

    target = next(t for t in plan.targets if t.name == target_name)
    fmt = FORMATS[target.format].plugin
    if not isinstance(fmt, Runtime):
        raise InputError(f"target '{target.name}': format {target.format} has no runtime here to time it in")
    threads = thread_count(target.params["threads"][0])
    fmt_params = {p.name: target.params[p.name] for p in FORMATS[target.format].params}
    key = stage_key("profile", load_key, target.device, target.format, fmt_params, threads, target.params["runs"],
                    target.params["warmups"], library_versions())
    hit = cache.get("profile", key) if cache is not None else None
    if hit is not None:
        return Table.from_dict(json.loads((hit / TABLE).read_text()))
    ctx = Context(plan, progress, program)

    def lower(model, folder: Path) -> Path:
        return folder / fmt.lower(model, target, folder, ctx)[0].path

    with progress.stage(f"profile target '{target.name}': a latency table, {target.format} at {threads} thread(s)"):
        table, _ = measure(program, lower, fmt.session, threads, target.params["runs"], target.params["warmups"])
    table = replace(table, target=target.name, runtime=target.format)
    if cache is not None:
        with cache.entry("profile", key) as folder:
            (folder / TABLE).write_text(json.dumps(table.to_dict(), indent=1) + "\n")
    return table


TABLE = "latency_table.json"
