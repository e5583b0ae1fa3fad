"""A latency grid's models: the model with every block alike at each point, built by the passes that declare an
axis (`Gridded`), never named here.

    models = grid_models(program)   # {(heads, units): Program, ..., "one": the model of one block}
"""

from __future__ import annotations

from evc.errors import InputError
from evc.ir.latency import grid
from evc.registry import PASSES


def grid_models(program) -> dict:
    """The grid's models, every block alike, keyed (heads, units); and "one", the model of one block."""
    heads, units = grid(program.structure)
    by_axis = {info.grid: info.plugin for info in PASSES.values() if info.grid}
    models = {}
    for h in heads:
        narrow = by_axis["heads"].at(program, h / heads[-1])
        for u in units:
            models[(h, u)] = by_axis["units"].at(narrow, u / units[-1])
    # A model of no block does not lower (nothing is left to recognise), so one of one block stands in:
    # base = T(one) - (T(all) - T(one)) / (depth - 1).
    models["one"] = by_axis["depth"].at(program, 1 / len(program.structure.blocks))
    return models


class Uniform:
    """What a pass asks of its context in a grid, answered the same for every block."""

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
