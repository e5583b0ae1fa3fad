"""head_prune: remove whole attention heads.

    head_prune { keep = 2/3, score = l1, scope = layer, min_heads = 1 }
    head_prune { keep = 0.5, score = taylor, scope = global, data = calib }

The q/k/v output rows of the removed heads, the matching input columns of the
output projection, and the head count wherever the graph reshapes by it all
go: the model gets smaller and faster, not sparser.
"""

from __future__ import annotations

from functools import partial

from evc.passes.knob import Knob
from evc.registry import Gridded, Pass, register_pass
from evc.spec.params import Choice, DataRef, Int, Invalid, Param, PerLayer, Ratio, When


def _check(params, spans):
    if params["scope"] == "global" and isinstance(params["keep"], PerLayer):
        raise Invalid("scope = global ranks all heads together and takes one keep, not a list",
                      params["keep"].span)


class Heads(Knob):
    """One head at a time, down to min_heads in every block."""

    def conflict(self, params):
        if params["scope"] == "global":
            return "scope", "a budget chooses head_prune's keep block by block: scope = global ranks all heads together"
        return None

    def groups(self, program, plan):
        least = plan.params["min_heads"]
        return [(b.index, b.attn.num_heads, 1, min(least, b.attn.num_heads)) for b in program.structure.blocks
                if b.attn is not None and b.attn.num_heads > least]


@register_pass(
    "head_prune",
    Param("keep", Ratio(), help="share of attention heads to keep", per_layer=True),
    Param("score", Choice(("l1", "l2", "taylor")), "l1",
          "how heads are ranked: weight norms, or Taylor importance on data"),
    Param("scope", Choice(("layer", "global")), "layer",
          "keep that share in every layer, or rank all heads of the model together"),
    Param("min_heads", Int(1), 1, "heads every layer keeps, whatever the scores"),
    Param("data", DataRef(), None, "images for score = taylor", needed_when=(When("score", ("taylor",)),)),
    check=_check,
    knob=Heads(),
)
class HeadPrune(Pass, Gridded):
    """Remove whole attention heads, ranked by weight norm or Taylor importance."""

    axis = "heads"

    def at(self, program, share):
        from evc.passes.grid import Uniform

        return self.run(program, dict(keep=share, score="l1", scope="layer", min_heads=1, data=None), Uniform(share))

    def run(self, program, params, ctx):
        from evc.passes.grouped import structure_first

        return structure_first(program, params, ctx, _by_structure, _by_groups)


def _by_structure(program, params, ctx):
    from evc.passes._importance import head_norms, head_taylor, top
    from evc.passes.surgery import keep_heads, rewritten

    structure = program.structure
    keep = ctx.per_layer("keep", structure.depth)
    blocks = [b for b in structure.blocks if b.attn is not None]
    if not blocks:
        raise ctx.error("keep", "the model has no attention heads to remove: its blocks mix tokens by "
                                "convolution or pooling alone (FastViT's RepMixer, PoolFormer)")
    if params["score"] == "taylor":
        scores = head_taylor(program.graph, blocks, ctx.images(params["data"]))
    else:
        p = 1 if params["score"] == "l1" else 2
        scores = [head_norms(program.graph, b.attn, p, f"block {b.index}") for b in blocks]
    counts = [b.attn.num_heads for b in blocks]
    if params["scope"] == "global":
        kept = _global_choice(scores, keep[0], params["min_heads"])
    else:
        kept = [top(s, _count(keep[b.index], n, params["min_heads"])) for b, s, n in zip(blocks, scores, counts)]
    return rewritten(program, [partial(keep_heads, attn=b.attn, keep=heads, where=f"block {b.index}")
                               for b, heads in zip(blocks, kept) if len(heads) < b.attn.num_heads])


def _by_groups(program, params, ctx):
    """Heads found from the graph's pruning groups: a model evc does not recognise."""
    from evc.passes._importance import top
    from evc.passes.grouped import pruned, ranked

    groups, keep, scores = ranked(program, "heads", params, ctx)
    if not groups:
        return program
    if params["scope"] == "global":
        kept = _global_choice(scores, keep[0], params["min_heads"])
    else:
        kept = [top(s, _count(k, g.heads, params["min_heads"])) for g, s, k in zip(groups, scores, keep)]
    return pruned(program, list(zip(groups, kept)))


def _count(keep: float, heads: int, min_heads: int) -> int:
    return max(min(min_heads, heads), min(heads, round(keep * heads)))


def _global_choice(scores, keep: float, min_heads: int) -> list[list[int]]:
    """Rank every head of the model together; each layer still keeps its `min_heads` best."""
    from evc.passes._importance import top

    total = sum(len(s) for s in scores)
    budget = max(round(keep * total), sum(min(min_heads, len(s)) for s in scores))
    kept = [set(top(s, min(min_heads, len(s)))) for s in scores]
    ranked = sorted(((-v, layer, head) for layer, s in enumerate(scores) for head, v in enumerate(s)))
    for _, layer, head in ranked:
        if sum(map(len, kept)) >= budget:
            break
        kept[layer].add(head)
    return [sorted(k) for k in kept]
