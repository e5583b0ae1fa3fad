"""Latency tables measured: the grid's models lowered as the target lowers them and timed in its runtime.

    evc profile specs/deit_tiny_x5.evc --target cpu       # the table, printed and cached
    budget { latency = 12ms, on = cpu, data = calib }     # the search reads it

The model is lowered as the target lowers it at each point of a grid (see
evc.ir.latency: every block alike, heads 1 to H or five levels of them; MLP
units at 1/8, 1/4, 1/2, 3/4 and all of them, rounded to 8), and once with one
block left (which, with the whole, gives what the stem, the head and the
runtime's call cost: a model of no block would not lower). Each is timed in
the target's runtime here, taking turns run by run, at the target's first
thread count.

Estimated for a format whose compiler estimates its artifact's latency
(`Estimated`: Vela's cycles for an Ethos-U NPU at its system's clock), with no
device and no timing. Measured here for targets whose device is this machine
(`device = cpu`, ONNX Runtime or LiteRT); for a device timed from here (`RemoteTimed`: a phone over
adb, by TFLite's benchmark_model), on it, one model after another (`evc
profile --serial`). A device evc does not reach (`BoardTimed`) gets a board
kit instead (evc.bundle.kit). The blocks must be alike (a plain ViT or DeiT):
a model whose stages differ in width needs a table per stage, and a block
left with attention or an MLP alone (block_skip) a table of its own, which evc
does not make yet.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from evc.errors import InputError
from evc.ir.latency import Table, table_of
from evc.passes.grid import grid_models
from evc.runtime.timing import interleaved, thread_count

TABLE = "latency_table.json"


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


def lowered(models: dict, lower, folder: Path) -> dict:
    """Each model lowered into a folder of its own: key -> the artifact's path."""
    paths = {}
    for i, (key, model) in enumerate(models.items()):
        (folder / str(i)).mkdir()
        paths[key] = lower(model, folder / str(i))
    return paths


def table_for(plan, target_name: str, program, cache, load_key: str, progress, serial: str | None = None,
              binary: Path | None = None) -> Table:
    """The latency table of `program` on the spec's target `target_name`, from the cache when it is there.
    A cpu target is timed here; an android one on the phone `serial` by `binary` (by default the device's tool
    for the target's format: benchmark_model for tflite, executor_runner for pte), only
    when they are given: a build reads the table `evc profile --serial` measured."""
    import json

    from evc.context import Context
    from evc.registry import DEVICES, FORMATS, BoardTimed, Estimated, RemoteTimed, Runtime

    target = next(t for t in plan.targets if t.name == target_name)
    fmt = FORMATS[target.format].plugin
    threads = threads_of(target)
    key = profile_key(plan, target, load_key)
    hit = cache.get("profile", key) if cache is not None else None
    device = DEVICES[target.device].plugin
    if hit is not None and not (serial and isinstance(device, RemoteTimed)):  # a serial given measures again
        return Table.from_dict(json.loads((hit / TABLE).read_text()))
    ctx = Context(plan, progress, program)

    def lower(model, folder: Path) -> Path:
        return folder / fmt.lower(model, target, folder, ctx)[0].path

    stage = f"profile target '{target.name}': a latency table, {target.format} at {threads} thread(s)"
    if isinstance(device, RemoteTimed):
        tool = device.binary(target.format)
        if serial is None:
            raise InputError(f"target '{target.name}' has no latency table yet: measure it on the phone with "
                             f"`evc profile {plan.path} --target {target.name} --serial SERIAL --binary {tool}`")
        binary = Path(binary or tool)
        phone = device.connect(serial, binary)  # before the models: a phone that is not there says so at once
        with progress.stage(stage + f" on '{serial}'"), tempfile.TemporaryDirectory() as folder:
            paths = lowered(grid_models(program), lower, Path(folder))
            times = device.time(phone, binary, paths, target.params, threads)
        table = replace(table_of(program, times, threads), runtime=f"{target.format} on {serial}")
    elif isinstance(fmt, Estimated):  # a compiler's estimate (Vela's): no device, no timing
        with progress.stage(f"profile target '{target.name}': a latency table from {target.format}'s estimates"), \
                tempfile.TemporaryDirectory() as folder:
            paths = lowered(grid_models(program), lower, Path(folder))
            times = {key: fmt.estimated_ms(path) for key, path in paths.items()}
        table = replace(table_of(program, times, threads), runtime=f"{target.format} estimate")
    elif not isinstance(device, BoardTimed) and isinstance(fmt, Runtime):
        with progress.stage(stage):
            table, _ = measure(program, lower, fmt.session, threads, target.params["runs"], target.params["warmups"])
        table = replace(table, runtime=target.format)
    else:
        raise InputError(f"target '{target.name}' has no latency table yet: `evc profile {plan.path} --target "
                         f"{target.name}` writes the models and scripts to time on the {target.device}, and "
                         "`--results FOLDER` reads back what they logged")
    return cached(replace(table, target=target.name), cache, key)


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


def cached(table: Table, cache, key: str) -> Table:
    """`table`, kept in the cache under `key` (when there is a cache)."""
    import json

    if cache is not None:
        with cache.entry("profile", key) as folder:
            (folder / TABLE).write_text(json.dumps(table.to_dict(), indent=1) + "\n")
    return table
