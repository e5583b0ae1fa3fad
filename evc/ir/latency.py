"""Latency lookup tables: what a block costs on a target, by heads and MLP width; a model's predicted time.

    table.predict(program.structure)     # ms: the blockless model's, plus each block's at its widths
    heads, units = grid(structure)       # the points a table is measured at (evc.runtime.profile times them)

After NViT's per-block latency table. A block's cost at a point of the grid
is the whole model's time there, less the blockless time, over the depth;
the cost between points is interpolated (bilinear in heads and units).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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


def table_of(program, times: dict, threads: int) -> Table:
    """The table from the grid models' ms, keyed (heads, units), and "one" for the model of one block
    (evc.passes.grid.grid_models)."""
    heads, units = grid(program.structure)
    depth = len(program.structure.blocks)
    whole = times[(heads[-1], units[-1])]
    base = times["one"] - (whole - times["one"]) / (depth - 1)
    block_ms = tuple(tuple(max(0.0, (times[(h, u)] - base) / depth) for u in units) for h in heads)
    return Table("", "", threads, depth, heads, units, base, block_ms)
