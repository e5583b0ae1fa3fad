"""patch_slim: drop the patch tokens that matter least, block by block (Patch Slimming, CVPR 2022).

    patch_slim { keep = [1, 1, 1, 0.7, 0.7, 0.7, 0.5, 0.5, 0.5, 0.4, 0.4, 0.4], fuse = true }
    patch_slim { search = { tolerance = 0.01, step = 8, data = calib } }

Before block l, the `keep[l]` share of the patches that entered block l-1
stays; the class and distillation tokens always stay. The counts are fixed
when the model is built, so every shape stays static, and both the attention
and the MLP of a slimmed block run on the kept tokens only. Patches are
ranked in the graph, at inference, by the class token's attention to them in
block l-1 (`cls_attention`), or by the attention they receive from all tokens
(`mean_attention`, for models without a class token). `fuse` adds one token,
the score-weighted mean of the dropped patches (EViT).

`search` finds `keep` with the paper's top-down algorithm: the last block
starts with no patch at all, and going down block by block each keeps `step`
more patches until the relative error of the final features on the data is
at most `tolerance`. The schedule found goes to the manifest and `evc explain`.
"""

from __future__ import annotations

import math
from functools import partial

from evc.passes.knob import Knob
from evc.registry import Pass, register_pass
from evc.spec.params import REQUIRED, Choice, DataRef, Flag, Float, Int, Invalid, Param, PerLayer, Record

SEARCH = Record((
    Param("tolerance", Float(0, open_low=True), 0.01, "largest relative error ‖f − f₀‖ / ‖f₀‖ of the final features"),
    Param("step", Int(1), 8, "patches added at a time while a block's error is above tolerance"),
    Param("data", DataRef(), REQUIRED, "images the error is measured on"),
))


def _check(params, spans):
    keep = params["keep"]
    if isinstance(keep, PerLayer) and keep.values[0] != 1:
        raise Invalid("keep: block 0 must keep every patch (1): no attention before it ranks them", keep.span)


class Patches(Knob):
    """Eighths of the patches entering each block, from 1 down to a quarter; block 0 keeps every patch."""

    keys = ("keep", "search")
    timed = False  # the latency table has no token axis yet
    ratio = False  # uniform ratios leave it whole: the sensitivity allocation chooses it

    def groups(self, program, plan):
        blocks = program.structure.blocks
        return [(b.index, 8, 1, 2) for b in blocks[1:] if blocks[b.index - 1].attn is not None]

    def levels(self, full, step, least):
        return [6, 4, 2]


@register_pass(
    "patch_slim",
    Param("keep", Float(0, 1), 1.0, "share of the patches entering block l-1 that enter block l (block 0 keeps all)",
          per_layer=True, not_with=("search",)),
    Param("score", Choice(("cls_attention", "mean_attention")), "cls_attention",
          "how patches are ranked: the class token's attention to them, or the attention they receive"),
    Param("fuse", Flag(), False, "add one token, the score-weighted mean of the dropped patches (EViT)"),
    Param("search", SEARCH, None, "find keep by the paper's top-down search instead"),
    check=_check,
    excludes={"token_merge": "both change the token count; use one of them"},
    knob=Patches(),
)
class PatchSlim(Pass):
    """Drop the patches that matter least before each block, with static token counts."""

    def run(self, program, params, ctx):
        if program.structure is None:
            return _on_stream(program, params, ctx)
        structure = program.structure
        prefix = len(structure.prefix_tokens)
        if params["score"] == "cls_attention" and not structure.prefix_tokens:
            raise ctx.error("score", "score = cls_attention needs a class token in the token stream, and this model "
                                     "has none: use score = mean_attention")
        first = structure.blocks[0].tokens - prefix
        shares = ctx.per_layer("keep", structure.depth)
        dropping = params["search"] is not None or any(s < 1 for s in shares[1:])
        if dropping and (reason := structure.fixed_token_count()) is not None:
            raise ctx.error("keep", f"cannot drop patches: {reason}")
        if params["search"] is not None:
            kept = search(program, params, ctx, first)
            keep = [1.0] + [share(k, m) for k, m in zip(kept[1:], entering(first, kept, params["fuse"])[1:])]
            ctx.report("keep", keep)
        else:
            kept = counts(first, (1.0, *shares[1:]), params["fuse"], _least(structure))
        return slimmed(program, kept, params["score"], params["fuse"], ctx)


def _round(x: float) -> int:
    return math.floor(x + 0.5)


def _least(structure) -> int:
    """A model with a class token may keep no patch at all; one without keeps at least one."""
    return 0 if structure.prefix_tokens else 1


def counts(first: int, keep, fuse: bool, least: int) -> list[int]:
    """Patches kept before each block, from per-block shares of those entering the block before."""
    kept, coming = [], first
    for share_ in keep:
        k = min(coming, max(least, _round(share_ * coming)))
        kept.append(k)
        coming = k + (fuse and k < coming)
    return kept


def entering(first: int, kept: list[int], fuse: bool) -> list[int]:
    """Patches entering each block (the fused token included), for a schedule of kept counts."""
    coming, out = first, []
    for k in kept:
        out.append(coming)
        coming = k + (fuse and k < coming)
    return out


def share(k: int, coming: int) -> float:
    """The shortest decimal share of `coming` that `counts` turns back into `k`."""
    for digits in range(1, 7):
        s = round(k / coming, digits)
        if 0 < s <= 1 and _round(s * coming) == k:
            return s
    return k / coming


def slimmed(program, kept: list[int], score: str, fuse: bool, ctx, graph=None):
    """`program` with patches dropped before each block where `kept` is below the count entering it.

    With `graph` (a copy of the program's graph), the edits go there and that
    graph is returned, without re-propagating shapes or re-recognising: the
    search's fast path.
    """
    from evc.passes.surgery import rewritten

    structure = program.structure
    prefix = len(structure.prefix_tokens)
    first = structure.blocks[0].tokens - prefix
    edits = []
    for block, k, coming in zip(structure.blocks, kept, entering(first, kept, fuse)):
        if block.index == 0 or k >= coming:
            continue
        before = structure.blocks[block.index - 1]
        if before.attn is None:
            raise ctx.error("keep", f"block {block.index}: block {before.index} has no attention to rank "
                                    "patches by, so no patch can be dropped there")
        stream = (before.mlp or before.attn).residual
        edits.append(partial(_slim, scores=(before.attn.score_node,), stream=stream, prefix=prefix, patches=coming,
                             keep=k, dim=structure.embed_dim, fuse=fuse, score=score))
    if graph is not None:
        for edit in edits:
            edit(graph)
        graph.recompile()
        return graph
    return rewritten(program, edits)


def _slim(gm, scores, stream, prefix, patches, keep, dim, fuse, score):
    """Drop patches from the stream leaving node `stream`, ranked by the attention maps of the score nodes
    `scores` summed (a parallel block has two)."""
    import operator

    from evc.passes import tokens
    from evc.passes.surgery import node_named, probs_at, reroute

    probs = [probs_at(gm, name) for name in scores]
    rank = tokens.class_attention if score == "cls_attention" else tokens.mean_attention
    stream = node_named(gm, stream)
    total = probs[0]
    for p in probs[1:]:  # a parallel block's attentions rank together
        with gm.graph.inserting_before(stream):
            total = gm.graph.call_function(operator.add, (total, p))
    reroute(gm, stream, lambda x, p: tokens.slim(x, rank(p, prefix), prefix, patches, keep, dim, fuse), [total])


def _on_stream(program, params, ctx):
    """patch_slim on a model evc does not recognise whose token count nothing in its graph fixes: blocks,
    prefix tokens and attention maps read from the graph (evc.ir.token_axis)."""
    from evc.ir.token_axis import token_stream
    from evc.passes.surgery import rewritten

    stream = token_stream(program, "pass patch_slim")
    if params["search"] is not None:
        raise ctx.error("search", "search measures the features a recognised ViT's head reads, and this model's "
                                  "blocks are found from its graph: give keep")
    if params["score"] == "cls_attention" and not stream.prefix:
        raise ctx.error("score", "score = cls_attention needs a class token in the token stream, and this model "
                                 "has none: use score = mean_attention")
    fuse, blocks = params["fuse"], stream.blocks
    first = blocks[0].tokens - stream.prefix
    kept = counts(first, (1.0, *ctx.per_layer("keep", len(blocks))[1:]), fuse, 0 if stream.prefix else 1)
    return rewritten(program, [
        partial(_slim, scores=blocks[b.index - 1].scores, stream=b.entry, prefix=stream.prefix,
                patches=coming, keep=k, dim=stream.dim, fuse=fuse, score=params["score"])
        for b, k, coming in zip(blocks, kept, entering(first, kept, fuse)) if b.index and k < coming])


def search(program, params, ctx, first: int) -> list[int]:
    """Patch Slimming's top-down search: the patches kept before each block."""
    import torch

    from evc.passes.surgery import features, sharing_weights

    settings = params["search"]
    fuse, score = params["fuse"], params["score"]
    images = torch.as_tensor(ctx.images(settings["data"]))
    base = features(program.graph, program.structure.head)
    with torch.inference_mode():
        reference = base(images)

    def error(kept: list[int]) -> float:
        graph = slimmed(program, kept, score, fuse, ctx, graph=sharing_weights(base))
        with torch.inference_mode():
            return float((graph(images) - reference).norm() / reference.norm())

    depth = program.structure.depth
    kept = [first] * depth
    for index in reversed(range(1, depth)):
        k = kept[index + 1] if index + 1 < depth else _least(program.structure)
        while k < first:
            kept[index] = k
            if error(kept) <= settings["tolerance"]:
                break
            k += settings["step"]
        else:
            kept[index] = first
            break  # this block keeps everything, so every block below it does too
    return kept
