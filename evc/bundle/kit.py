"""A board kit: what times a latency grid on a board evc does not reach (`BoardTimed`: the RDK X5, Jetsons).

    names = board_kit(plan, target, program, folder, keys, progress)   # one bundle per grid model, profile.sh
    table = read_results(plan, target, program, folder, keys.load, cache)  # after its scripts ran on the board
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from evc.errors import BuildError, InputError
from evc.ir.latency import Table, table_of
from evc.runtime.profile import cached, profile_key, threads_of

KIT = "profile.json"  # a board kit's record: the grid, each model's folder, the key the table will carry


def board_kit(plan, target, program, folder: Path, keys, progress) -> list[str]:
    """Write at `folder` what times the grid on a board evc does not reach: one bundle per grid model, made as
    `evc build` makes the target's (lowered, checked against PyTorch, with its build and bench scripts), and
    profile.sh, which runs their scripts in turn. The folder names, in order."""
    import json
    import shutil
    import tempfile

    from evc.atomic import staged
    from evc.bundle import write as bundles
    from evc.bundle.scripts import render_one
    from evc.ir.summary import summary as summarize
    from evc.passes.compress import Compiled
    from evc.passes.grid import grid_models
    from evc.registry import DEVICES
    from evc.targets.lower import ParityFailure, lower

    device = DEVICES[target.device].plugin
    models = grid_models(program)
    names = {key: "one" if key == "one" else f"heads{key[0]}_units{key[1]}" for key in models}
    with staged(folder, f"write the board kit of target '{target.name}'") as out:
        for key, model in models.items():
            summary = summarize(model)
            compiled = Compiled(model, summary, summary, [], keys.weights, "profile")
            with progress.stage(f"grid model {names[key]}"), tempfile.TemporaryDirectory() as lowered:
                try:
                    checked = lower(plan, target, compiled, Path(lowered), progress)
                except ParityFailure as failure:
                    shutil.rmtree(failure.artifacts, ignore_errors=True)
                    raise BuildError(f"grid model {names[key]}: {failure}") from None
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
    return cached(table, cache, key)
