"""block_skip: remove attention sublayers, MLP sublayers or whole blocks; the residual path stays.

    block_skip { attn = [10, 11], mlp = [], blocks = [] }
    block_skip { count = 2, part = attn, score = residual, data = calib }

These are the skip configurations of Unified Vision Transformer Compression
(ICLR 2022). With `count`, the sublayers that add least to the residual
stream on the data, ‖f(x)‖ / ‖x‖, are removed.

On a model evc does not recognise, there are no blocks to name: `count`
removes that many of the residual branches its graph holds
(`evc.ir.residuals`), attention or token mixers with `part = attn`, MLPs
with `part = mlp`, each add then passing its skip on alone.
"""

from __future__ import annotations

from functools import partial

from evc.passes.knob import Knob
from evc.registry import Gridded, Pass, register_pass
from evc.spec.params import Choice, DataRef, Int, ListOf, Param, When

_INDICES = ListOf(Int(0), empty_ok=True)


class Skips(Knob):
    """One group per block whose `part` can go: width 1 kept, 0 removed."""

    keys = ("attn", "mlp", "blocks", "count")
    timed = False  # nor a block left half
    ratio = False  # uniform ratios leave it whole: the sensitivity allocation chooses it
    LIST = {"attn": "attn", "mlp": "mlp", "block": "blocks"}

    def groups(self, program, plan):
        part = plan.params["part"]
        return [(b.index, 1, 1, 0) for b in program.structure.blocks
                if (b.attn is not None if part != "mlp" else True) and (b.mlp is not None if part != "attn" else True)]

    def levels(self, full, step, least):
        return [0]

    def values(self, plan, widths, depth):
        gone = tuple(b for b in range(depth) if widths.get(b, 1) == 0)
        return {k: gone if k == self.LIST[plan.params["part"]] else () for k in ("attn", "mlp", "blocks")}

    def record(self, plan, widths, depth):
        return {self.LIST[plan.params["part"]]: [b for b in range(depth) if widths.get(b, 1) == 0]}

    def pinned(self, plan, entry):
        return {k: tuple(entry.get(k, ())) for k in ("attn", "mlp", "blocks")}


@register_pass(
    "block_skip",
    Param("attn", _INDICES, (), "blocks whose attention sublayer is removed"),
    Param("mlp", _INDICES, (), "blocks whose MLP sublayer is removed"),
    Param("blocks", _INDICES, (), "blocks removed whole"),
    Param("count", Int(1), None, "remove this many, chosen by score, instead of naming them",
          not_with=("attn", "mlp", "blocks")),
    Param("part", Choice(("attn", "mlp", "block")), "attn", "what `count` removes"),
    Param("score", Choice(("residual",)), "residual",
          "how `count` chooses: least ‖f(x)‖ / ‖x‖ on the data"),
    Param("data", DataRef(), None, "images for `count`",
          needed_when=(When("count"), When("score", ("residual",)))),
    knob=Skips(),
)
class BlockSkip(Pass, Gridded):
    """Remove attention sublayers, MLP sublayers or whole blocks, keeping the residual path."""

    axis = "depth"

    def at(self, program, share):
        from evc.passes.grid import Uniform

        depth = len(program.structure.blocks)
        kept = max(1, round(share * depth))
        return self.run(program, dict(attn=(), mlp=(), blocks=tuple(range(kept, depth)), count=None, part="block",
                                      score="residual", data=None), Uniform(1.0))

    def run(self, program, params, ctx):
        from evc.passes.surgery import rewritten, skip_sublayer

        if program.structure is None:
            return _on_graph(program, params, ctx)
        blocks = {b.index: b for b in program.structure.blocks}
        if params["count"] is not None:
            residuals = _by_score(program, params, ctx)
        else:
            residuals = _named(blocks, params, ctx)
        return rewritten(program, [partial(skip_sublayer, residual=r) for r in residuals])


def _sublayers(block, part: str) -> list:
    """The sublayers of `block` that `part` names, in graph order; a whole block takes its conv mixers too."""
    parts = {"attn": [block.attn], "mlp": [block.mlp], "block": [block.attn, block.mlp, *block.local]}[part]
    return sorted((p for p in parts if p is not None), key=lambda p: block.nodes.index(p.residual))


def _named(blocks: dict, params, ctx) -> list[str]:
    residuals = []
    for key, part in (("attn", "attn"), ("mlp", "mlp"), ("blocks", "block")):
        for index in params[key]:
            if index not in blocks:
                raise ctx.error(key, f"{key}: block {index} does not exist: the model has depth {len(blocks)} "
                                     f"(blocks 0 to {len(blocks) - 1})")
            residuals += [s.residual for s in _sublayers(blocks[index], part)]
    return list(dict.fromkeys(residuals))


def _by_score(program, params, ctx) -> list[str]:
    from evc.passes._importance import residual_ratios

    part, spans, members = params["part"], {}, {}
    for block in program.structure.blocks:
        subs = _sublayers(block, part)
        if part == "block" and len(subs) < 2 or not subs:
            continue
        first = _stream_input(program.graph, subs[0].residual)
        spans[str(block.index)] = (first, subs[-1].residual)
        members[str(block.index)] = [s.residual for s in subs]
    if params["count"] > len(spans):
        raise ctx.error("count", f"count: the model has only {len(spans)} {part} parts that can be removed")
    ratios = residual_ratios(program.graph, spans, ctx.images(params["data"]))
    chosen = sorted(ratios, key=ratios.get)[: params["count"]]
    return [r for name in chosen for r in members[name]]


def _stream_input(graph, residual: str) -> str:
    """The residual stream entering the sublayer that the add `residual` closes: its earlier operand."""
    nodes = list(graph.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    add = next(n for n in nodes if n.name == residual)
    return min((a for a in add.args[:2] if hasattr(a, "name")), key=order.__getitem__).name


def _on_graph(program, params, ctx):
    """block_skip on a model evc does not recognise: `count` of the residual branches of its graph go,
    those that add least to their stream."""
    from evc.ir.residuals import residual_branches
    from evc.passes._importance import residual_ratios
    from evc.passes.surgery import rewritten, skip_sublayer

    why = f"evc does not recognise this model's blocks ({program.unrecognised})"
    instead = "name none: `count = N` with `part = attn` or `part = mlp` removes the N residual branches that add least"
    named = next((key for key in ("attn", "mlp", "blocks") if params[key]), None)
    if named is not None:
        raise ctx.error(named, f"{named}: {why}; {instead}")
    if params["count"] is None:
        return program
    part = params["part"]
    if part == "block":
        raise ctx.error("part", f"part = block: {why}; {instead}")
    branches = {b.add: b for b in residual_branches(program.graph) if b.kind == part}
    if params["count"] > len(branches):
        found = f"only {len(branches)}" if branches else "no"
        raise ctx.error("count", f"count: the model has {found} residual branches {_KINDS[part]} to remove")
    ratios = residual_ratios(program.graph, {add: (b.skip, add) for add, b in branches.items()},
                             ctx.images(params["data"]))
    chosen = set(sorted(ratios, key=ratios.get)[: params["count"]])
    # in graph order: a branch inside another chosen one goes first, and the outer one's add is still there
    return rewritten(program, [partial(skip_sublayer, residual=add, skip=b.skip) for add, b in branches.items()
                               if add in chosen])


_KINDS = {"attn": "that mix tokens (attention, pooling, a convolution wider than 1 x 1)",
          "mlp": "that act on each token alone (MLPs)"}
