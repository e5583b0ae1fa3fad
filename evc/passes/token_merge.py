"""token_merge: merge similar tokens inside each block (Token Merging, ToMe, ICLR 2023).

    token_merge { r = 8 }
    token_merge { r = [0, 0, 16, 16, 16, 16, 8, 8, 8, 8, 0, 0] }

After the attention of each block, Token Merging's bipartite soft matching
merges `r` tokens into the ones most similar to them (by the block's keys,
averaged over heads); the MLP and every later block run on the fewer tokens.
Merged tokens are size-weighted averages, and later attentions add log(size)
to their logits (proportional attention), as in the paper. The matching is
written with static shapes: topk and one-hot matmuls, no scatter_reduce or
argsort, so it lowers to ONNX, TFLite and NPUs. The class token is never
merged away, nor does the distillation token receive.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from evc.registry import Pass, register_pass
from evc.spec.params import Flag, Int, Param


@register_pass(
    "token_merge",
    Param("r", Int(0), help="tokens merged in each block", per_layer=True),
    Param("proportional", Flag(), True,
          "proportional attention: later attentions add log(size) to their logits, as ToMe does"),
    excludes={"patch_slim": "both change the token count; use one of them"},
)
class TokenMerge(Pass):
    """Merge r similar tokens in each block by bipartite soft matching, with static shapes."""

    def run(self, program, params, ctx):
        from evc.passes.surgery import rewritten

        if program.structure is None:  # blocks read from the graph: a free token stream (evc.ir.token_axis)
            from evc.ir.token_axis import token_stream

            stream = token_stream(program, "pass token_merge")
            blocks = [Block(b.index, b.tokens, b.scores, b.attn_add) for b in stream.blocks]
            prefix, fixed = stream.prefix, None
        else:
            structure = program.structure
            blocks = [Block(b.index, b.tokens, (b.attn.score_node,), b.attn.residual) if b.attn else
                      Block(b.index, b.tokens, (), None) for b in structure.blocks]
            prefix, fixed = len(structure.prefix_tokens), structure.fixed_token_count()
        if prefix > 2:
            raise ctx.error("r", f"the model has {prefix} prefix tokens; ToMe protects a class and a distillation "
                                 "token, not more")
        plan, tokens, asked = [], blocks[0].tokens, ctx.per_layer("r", len(blocks))
        for block, r in zip(blocks, asked):
            r = min(r, (tokens - prefix) // 2) if block.scores else 0  # ToMe's cap: half the tokens
            plan.append((block, r, tokens))
            tokens -= r
        merged = [r for _, r, _ in plan]
        if merged != list(asked):
            ctx.report("r", merged)  # what each block could merge, where fewer tokens were left than asked
        if not any(r for _, r, _ in plan):
            return program
        if fixed is not None:
            raise ctx.error("r", f"cannot merge tokens: {fixed}")
        return rewritten(program, [partial(_merge, plan=plan, cls=prefix >= 1, distill=prefix == 2,
                                           proportional=params["proportional"])])


@dataclass(frozen=True)
class Block:
    """What merging reads of a block: its attention's score nodes (softmax or sdpa; two side by side in a
    parallel block) and the residual add closing its attention, where tokens merge."""

    index: int
    tokens: int
    scores: tuple[str, ...]
    attn_add: str | None


def _merge(gm, plan, cls: bool, distill: bool, proportional: bool) -> None:
    """Merge in every block, carrying each token's size from block to block."""
    from evc.passes.surgery import add_attention_bias, inline, node_named, probs_at, reroute

    size = None
    for block, r, count in plan:
        if size is None and r == 0 or not block.scores:
            continue
        probs = [probs_at(gm, name) for name in block.scores]
        key_t = _keys(gm, probs, f"block {block.index}")  # found before a bias joins the logits
        if size is not None and proportional:
            for p in probs:
                add_attention_bias(gm, p, inline(gm, _log_size, [size], p.args[0]))
        if r == 0:
            continue
        merger = _merger(count, r, cls, distill, first=size is None)
        _, size = reroute(gm, node_named(gm, block.attn_add), merger, [key_t] if size is None else [key_t, size])


def _keys(gm, probs, where: str):
    """The transposed keys (B, heads, head_dim, N) of the attentions `probs`; side by side ones joined as more
    heads, so ToMe's metric averages over all of them."""
    import torch

    from evc.passes.surgery import attention_keys

    keys = [attention_keys(gm, p, where) for p in probs]
    if len(keys) == 1:
        return keys[0]
    with gm.graph.inserting_after(probs[-1]):
        return gm.graph.call_function(torch.cat, (keys, 1))


def _log_size(size):
    return size.log().transpose(1, 2).unsqueeze(1)  # (B, N, 1) -> (B, 1, 1, N): one bias per key


def _merger(count: int, r: int, cls: bool, distill: bool, first: bool):
    """merge(x, key_t[, size]) for one block; before the first merge every token has size 1."""
    from evc.passes import tokens
    if first:
        return lambda x, key_t: tokens.merge(x, tokens.unit_size(x), tokens.key_metric(key_t),
                                             count, r, cls, distill)
    return lambda x, key_t, size: tokens.merge(x, size, tokens.key_metric(key_t), count, r, cls, distill)
