"""ffn_prune: remove hidden units of each MLP.

    ffn_prune { keep = 70%, score = l1, round_to = 8 }
    ffn_prune { keep = [1, 1, 0.5, ...], score = activation, data = calib }

fc1's output rows and fc2's input columns go together, ranked by one shared
score, as Hugging Face nn_pruning does.
"""

from __future__ import annotations

from functools import partial

from evc.passes.knob import Knob
from evc.registry import Gridded, Pass, register_pass
from evc.spec.params import Choice, DataRef, Int, Param, Ratio, When


class Units(Knob):
    """round_to MLP units at a time, down to round_to in every block."""

    def groups(self, program, plan):
        step = plan.params["round_to"]
        return [(b.index, b.mlp.hidden, step, step) for b in program.structure.blocks
                if b.mlp is not None and b.mlp.hidden > step]


@register_pass(
    "ffn_prune",
    Param("keep", Ratio(), help="share of each MLP's hidden units to keep", per_layer=True),
    Param("score", Choice(("l1", "l2", "taylor", "activation")), "l1",
          "how units are ranked: weight norms, Taylor importance or mean |activation| on data"),
    Param("round_to", Int(1), 8, "keep the hidden width a multiple of this (kernels are fastest on 8 or 16)"),
    Param("data", DataRef(), None, "images for score = taylor or activation",
          needed_when=(When("score", ("taylor", "activation")),)),
    knob=Units(),
)
class FfnPrune(Pass, Gridded):
    """Remove MLP hidden units: fc1 rows and fc2 columns, by one shared score."""

    axis = "units"

    def at(self, program, share):
        from evc.ir.latency import ROUND_TO
        from evc.passes.grid import Uniform

        return self.run(program, dict(keep=share, score="l1", round_to=ROUND_TO, data=None), Uniform(share))

    def run(self, program, params, ctx):
        from evc.passes.grouped import structure_first

        return structure_first(program, params, ctx, _by_structure, _by_groups)


def _by_structure(program, params, ctx):
    from evc.passes._importance import activations, hidden_norms, hidden_taylor, top
    from evc.passes.surgery import keep_hidden, rewritten

    structure = program.structure
    keep = ctx.per_layer("keep", structure.depth)
    blocks = [b for b in structure.blocks if b.mlp is not None]
    if not blocks:
        raise ctx.error("keep", "the model has no MLP left to remove hidden units from")
    score = params["score"]
    if score == "taylor":
        scores = hidden_taylor(program.graph, blocks, ctx.images(params["data"]))
    elif score == "activation":
        scores = activations(program.graph, blocks, ctx.images(params["data"]))
    else:
        scores = [hidden_norms(program.graph, b.mlp, 1 if score == "l1" else 2) for b in blocks]
    widths = [width(keep[b.index], b.mlp.hidden, params["round_to"]) for b in blocks]
    return rewritten(program, [partial(keep_hidden, mlp=b.mlp, keep=top(s, w), where=f"block {b.index}")
                               for b, s, w in zip(blocks, scores, widths) if w < b.mlp.hidden])


def _by_groups(program, params, ctx):
    """FFN units found from the graph's pruning groups: a model evc does not recognise."""
    from evc.passes._importance import top
    from evc.passes.grouped import pruned, ranked

    groups, keep, scores = ranked(program, "units", params, ctx)
    return pruned(program, [(g, top(s, width(k, g.width, params["round_to"])))
                            for g, s, k in zip(groups, scores, keep)])


def width(keep: float, hidden: int, round_to: int) -> int:
    """Hidden units kept: keep × hidden rounded to a multiple of round_to, at least one multiple."""
    if keep >= 1:
        return hidden
    rounded = round(keep * hidden / round_to) * round_to
    return min(hidden, max(round_to, rounded))
