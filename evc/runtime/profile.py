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

Measured here for targets whose device is this machine (`device = cpu`, ONNX
Runtime or LiteRT); for a phone (`device = android`), on the phone over adb
by TFLite's benchmark_model, one model after another (`evc profile --serial`).
The blocks must be alike (a plain ViT or DeiT): a model whose stages differ
in width needs a table per stage, and a block left with attention or an MLP
alone (block_skip) a table of its own, which evc does not make yet.
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
    base_ms: float  # the model without blocks (the stem, the head, the call), from the one-block model
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
    `session(path, threads)` runs it here. Models `alongside` (name: Program) are timed in the same turns,
    and their ms returned with the table: (table, {name: ms})."""
    models = {**grid_models(program), **{("alongside", name): m for name, m in (alongside or {}).items()}}
    with tempfile.TemporaryDirectory() as folder:
        runs_ = {key: session(path, threads) for key, path in lowered(models, lower, Path(folder)).items()}
        feed = np.random.default_rng(0).standard_normal(program.input.shape, dtype=np.float32)
        times = interleaved(runs_, feed, runs, warmups)
    return table_of(program, times, threads), {key[1]: ms for key, ms in times.items() if key[0] == "alongside"}


def grid_models(program) -> dict:
    """The grid's models, every block alike, keyed (heads, units); and "one", the model of one block."""
    from evc.passes.block_skip import BlockSkip
    from evc.passes.ffn_prune import FfnPrune
    from evc.passes.head_prune import HeadPrune

    heads, units = grid(program.structure)
    models = {}
    for h in heads:
        narrow = HeadPrune().run(program, dict(keep=h / heads[-1], score="l1", scope="layer", min_heads=1,
                                               data=None), _Uniform(h / heads[-1]))
        for u in units:
            models[(h, u)] = FfnPrune().run(narrow, dict(keep=u / units[-1], score="l1", round_to=ROUND_TO,
                                                         data=None), _Uniform(u / units[-1]))
    # A model of no block does not lower (nothing is left to recognise), so one of one block stands in:
    # base = T(one) - (T(all) - T(one)) / (depth - 1).
    depth = len(program.structure.blocks)
    models["one"] = BlockSkip().run(program, dict(attn=(), mlp=(), blocks=tuple(range(1, depth)), count=None,
                                                  part="block", score="residual", data=None), _Uniform(1.0))
    return models


def lowered(models: dict, lower, folder: Path) -> dict:
    """Each model lowered into a folder of its own: key -> the artifact's path."""
    paths = {}
    for i, (key, model) in enumerate(models.items()):
        (folder / str(i)).mkdir()
        paths[key] = lower(model, folder / str(i))
    return paths


def table_of(program, times: dict, threads: int) -> Table:
    """The table from the grid models' ms (keyed as grid_models keys them)."""
    heads, units = grid(program.structure)
    depth = len(program.structure.blocks)
    whole = times[(heads[-1], units[-1])]
    base = times["one"] - (whole - times["one"]) / (depth - 1)
    block_ms = tuple(tuple(max(0.0, (times[(h, u)] - base) / depth) for u in units) for h in heads)
    return Table("", "", threads, depth, heads, units, base, block_ms)


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


def table_for(plan, target_name: str, program, cache, load_key: str, progress, serial: str | None = None,
              binary: Path | None = None) -> Table:
    """The latency table of `program` on the spec's target `target_name`, from the cache when it is there.
    A cpu target is timed here; an android one on the phone `serial` by `binary` (benchmark_model), only
    when they are given: a build reads the table `evc profile --serial` measured."""
    import json

    from evc.context import Context
    from evc.registry import FORMATS, Runtime

    target = next(t for t in plan.targets if t.name == target_name)
    fmt = FORMATS[target.format].plugin
    threads = threads_of(target)
    key = profile_key(plan, target, load_key)
    hit = cache.get("profile", key) if cache is not None else None
    if hit is not None and not (serial and target.device == "android"):  # a serial given measures again
        return Table.from_dict(json.loads((hit / TABLE).read_text()))
    ctx = Context(plan, progress, program)

    def lower(model, folder: Path) -> Path:
        return folder / fmt.lower(model, target, folder, ctx)[0].path

    stage = f"profile target '{target.name}': a latency table, {target.format} at {threads} thread(s)"
    if target.device == "android":
        from evc.targets.android import profiling_phone, time_on_phone

        if serial is None:
            raise InputError(f"target '{target.name}' has no latency table yet: measure it on the phone with "
                             f"`evc profile {plan.path} --target {target.name} --serial SERIAL --binary "
                             "benchmark_model`")
        binary = Path(binary or "benchmark_model")
        device = profiling_phone(serial, binary)  # before the models: a phone that is not there says so at once
        with progress.stage(stage + f" on '{serial}'"), tempfile.TemporaryDirectory() as folder:
            paths = lowered(grid_models(program), lower, Path(folder))
            times = time_on_phone(device, binary, paths, target.params, threads)
        table = replace(table_of(program, times, threads), runtime=f"{target.format} on {serial}")
    elif target.device == "cpu" and isinstance(fmt, Runtime):
        with progress.stage(stage):
            table, _ = measure(program, lower, fmt.session, threads, target.params["runs"], target.params["warmups"])
        table = replace(table, runtime=target.format)
    else:
        raise InputError(f"target '{target.name}' has no latency table yet: `evc profile {plan.path} --target "
                         f"{target.name}` writes the models and scripts to time on the {target.device}, and "
                         "`--results FOLDER` reads back what they logged")
    return _cached(replace(table, target=target.name), cache, key)


def profile_key(plan, target, load_key: str) -> str:
    """What a target's latency table follows from: the model as loaded, how the target lowers and times it."""
    from evc.keys import library_versions, stage_key
    from evc.registry import FORMATS

    fmt_params = {p.name: target.params[p.name] for p in FORMATS[target.format].params}
    timing = {k: target.params.get(k) for k in ("runs", "warmups", "cores", "frame_count", "iterations",
                                                  "precision")}
    return stage_key("profile", load_key, target.device, target.format, fmt_params, threads_of(target), timing,
                     library_versions())


def threads_of(target) -> int:
    """The thread count a target's table is timed at: its first."""
    return thread_count(target.params.get("threads", (1,))[0])


def _cached(table: Table, cache, key: str) -> Table:
    import json

    if cache is not None:
        with cache.entry("profile", key) as folder:
            (folder / TABLE).write_text(json.dumps(table.to_dict(), indent=1) + "\n")
    return table


KIT = "profile.json"  # a board kit's record: the grid, each model's folder, the key the table will carry


def board_kit(plan, target, program, folder: Path, keys, progress) -> list[str]:
    """Write at `folder` what times the grid on a board evc does not reach: one bundle per grid model, made as
    `evc build` makes the target's (lowered, checked against PyTorch, with its build and bench scripts), and
    profile.sh, which runs their scripts in turn. The folder names, in order."""
    import json
    import tempfile

    from evc.bundle import write as bundles
    from evc.atomic import staged
    from evc.passes.compress import Compiled, _summary
    from evc.targets.lower import CHECKED, _lower_and_validate
    from evc.registry import DEVICES
    from evc.bundle.scripts import render_one

    device = DEVICES[target.device].plugin
    models = grid_models(program)
    names = {key: "one" if key == "one" else f"heads{key[0]}_units{key[1]}" for key in models}
    with staged(folder) as out:
        for key, model in models.items():
            summary = _summary(model)
            compiled = Compiled(model, summary, summary, [], keys.weights, "profile")
            with progress.stage(f"grid model {names[key]}"), tempfile.TemporaryDirectory() as lowered:
                _lower_and_validate(plan, target, compiled, Path(lowered), out / names[key], progress)
                checked = json.loads((Path(lowered) / CHECKED).read_text())
                bundles.write(plan, target, compiled, Path(lowered), checked, "profile", out / names[key])
        record = {"target": target.name, "device": target.device, "key": profile_key(plan, target, keys.load),
                  "threads": threads_of(target),
                  "models": [{"folder": names[k], "heads": k[0], "units": k[1]} if k != "one"
                             else {"folder": "one", "blocks": 1} for k in models]}
        (out / KIT).write_text(json.dumps(record, indent=1) + "\n")
        render_one("_profile", "profile.sh.j2", out / "profile.sh", spec=str(plan.path), target=target.name,
                   device=target.device, steps=device.steps, models=list(names.values()), folder=str(folder))
    return list(names.values())


def read_results(plan, target, program, folder: Path, load_key: str, cache) -> Table:
    """The table from a board kit whose scripts ran: each grid model's logged latency, read by its device."""
    import json

    from evc.registry import DEVICES

    try:
        record = json.loads((folder / KIT).read_text())
    except FileNotFoundError:
        raise InputError(f"--results {folder}: no {KIT}: give the folder `evc profile --target {target.name}` "
                         "wrote, with the logs its scripts left") from None
    except (OSError, ValueError) as e:
        raise InputError(f"--results {folder}/{KIT}: cannot read it ({e})") from None
    key = profile_key(plan, target, load_key)
    if record.get("key") != key:
        raise InputError(f"--results {folder}: these models were made for another model, target or toolchain "
                         f"setting than target '{target.name}' of {plan.path} now has; make the kit again")
    device = DEVICES[target.device].plugin
    times = {}
    for model in record["models"]:
        ms = device.latency_ms(folder / model["folder"], record["threads"])
        times["one" if model["folder"] == "one" else (model["heads"], model["units"])] = ms
    table = replace(table_of(program, times, record["threads"]), target=target.name,
                    runtime=f"{target.format} on the {target.device}")
    return _cached(table, cache, key)


TABLE = "latency_table.json"
