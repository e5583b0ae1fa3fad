"""Where the token count of a graph is fixed: what patch_slim and token_merge read on a model evc does not
recognise, to say which node stops them.

    token_count_fixed(gm)   # "node 'view' reshapes the 256 tokens of (1, 16, 256) into ...", or None
    stream = token_stream(program, "pass patch_slim")   # blocks, prefix and width of a free token stream

Token passes change how many tokens flow from one block to the next. That is
possible only in a stream of tokens (batch, tokens, channels) that nothing
downstream counts: no convolution or pooling on a map of them, no window
partition, no table with an entry per token position. This reads the graph
from its first residual add on (evc.ir.residuals), the stream's token count N
being the axis of the stream that is neither batch nor channels, and names
the first node that fixes N (a reshape that merges the tokens into the
batch, one row each, leaves it free):

- an output that is a map (depth, segmentation, backbone features);
- a stream that is already a map (batch, channels, height, width);
- a reshape that folds N tokens into a grid or windows (N into (H, W), or
  windows into the batch), after which convolutions and pooling count them;
- a parameter or buffer with an axis of N entries (relative positions, a
  gate per position pair), which gives each token position its own value.

A size N that happens to equal another axis of the graph can be mistaken for
the token axis; the passes check their result against PyTorch anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import fx

from evc.ir.residuals import residual_branches
from evc.ir.view import RecognitionError, View, between, is_score, is_sdpa, node_shape

_RESHAPES = ("view", "reshape", "unflatten")


def token_count_fixed(gm: fx.GraphModule) -> str | None:
    """Why the graph's token count cannot change after its first residual add, naming the node; None where
    nothing in the graph fixes it."""
    branches = residual_branches(gm)
    if not branches:
        return "the graph has no residual stream of blocks to drop or merge tokens in"
    nodes = list(gm.graph.nodes)
    out = nodes[-1].all_input_nodes[0] if nodes[-1].all_input_nodes else None
    if out is not None and node_shape(out) is not None and len(node_shape(out)) > 2:
        return (f"the model's output at node '{out.name}' is a map of shape {tuple(node_shape(out))}: its size "
                "fixes the token count")
    names = {n.name: n for n in nodes}
    first = names[branches[0].add]
    shape = node_shape(first)
    if shape is None or len(shape) != 3:
        return (f"the residual stream at node '{first.name}' has shape {tuple(shape or ())}, not (batch, tokens, "
                "channels): a map, whose convolutions and pooling fix its token count")
    tokens = {node_shape(names[b.add])[1] for b in branches if len(node_shape(names[b.add]) or ()) == 3} - {1}
    for node in nodes[nodes.index(first) + 1:]:
        reason = _fixes(node, tokens)
        if reason:
            return reason
    return None


def _fixes(node: fx.Node, tokens: set[int]) -> str | None:
    shape = node_shape(node)
    if node.op == "get_attr":
        if shape and tokens & set(shape):
            return (f"node '{node.name}' reads '{node.target}' of shape {tuple(shape)}, a table with an entry per "
                    "token position, which fixes the token count")
        return None
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name not in _RESHAPES or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    before = node_shape(node.args[0])
    if before is None or shape is None or len(before) != 3:  # (batch, tokens, channels) or (batch, channels, tokens)
        return None
    for axis in (1, 2):
        n = before[axis]
        if n in tokens and n not in shape[1:] and math.prod(before[:axis + 1]) not in shape:
            return (f"node '{node.name}' reshapes the {n} tokens of {tuple(before)} into {tuple(shape)}: a grid "
                    "or windows, whose size fixes the token count")
    return None


@dataclass(frozen=True)
class TokenBlock:
    """One block of a free token stream: an attention branch and the branches after it up to the next."""

    index: int
    tokens: int  # entering it, prefix tokens included
    scores: tuple[str, ...]  # its attention's softmax or scaled_dot_product_attention nodes (two: parallel blocks)
    attn_add: str  # the residual add closing its attention branch: where ToMe merges
    entry: str | None  # the residual add before it, whose value enters it (None for the first block)


@dataclass(frozen=True)
class TokenStream:
    """A (batch, tokens, channels) stream nothing fixes the count of, read from the graph alone."""

    prefix: int  # class and distillation tokens before the patches, never dropped
    dim: int
    blocks: tuple[TokenBlock, ...]


def token_stream(program, what: str) -> TokenStream:
    """The token stream of an unrecognised model whose token count nothing fixes (evc.ir.residuals gives its
    branches, each attention branch starting a block); an error naming the node where there is none."""
    gm = program.graph
    reason = token_count_fixed(gm)
    if reason is not None:
        raise RecognitionError("", f"{what} cannot change this model's token count: {reason}")
    names, view = {n.name: n for n in gm.graph.nodes}, View(gm)
    branches = residual_branches(gm)
    if branches[0].kind != "attn":
        raise RecognitionError(branches[0].add, f"{what}: the first residual branch, ending at node "
                                                f"'{branches[0].add}', mixes no tokens: no attention ranks them")
    blocks, previous = [], None
    for branch in branches:
        if branch.kind == "attn":
            tokens = node_shape(names[branch.add])[1]
            inside = between(view, names[branch.skip], names[branch.add])  # also what a token op reads after it
            scores = tuple(n.name for n in inside if is_score(n) and _keys(n) == tokens)
            if not scores:
                raise RecognitionError(branch.add, f"{what}: the token-mixing branch ending at node '{branch.add}' "
                                                   "has no attention over the tokens to rank them by")
            blocks.append(TokenBlock(len(blocks), tokens, scores, branch.add, previous))
        previous = branch.add
    first = names[branches[0].add]
    return TokenStream(_prefix(gm, first, blocks[0].tokens, what), node_shape(first)[-1], tuple(blocks))


def _keys(score: fx.Node) -> int | None:
    """How many keys an attention attends over: a softmax's last axis, or scaled_dot_product_attention's k."""
    shape = node_shape(score.args[1] if is_sdpa(score) else score)
    return shape[-2 if is_sdpa(score) else -1] if shape else None


def _prefix(gm: fx.GraphModule, first: fx.Node, tokens: int, what: str) -> int:
    """The tokens a concatenation before the first block puts ahead of the patches (its largest operand):
    class, distillation and register tokens."""
    nodes = list(gm.graph.nodes)
    cats = [n for n in nodes[:nodes.index(first)] if getattr(n.target, "__name__", "") in ("cat", "concat")
            and (node_shape(n) or (0, 0))[1:2] == (tokens,)]
    if not cats:
        return 0
    sizes = [node_shape(p)[1] for p in cats[-1].args[0]]
    if sizes.index(max(sizes)) != len(sizes) - 1:
        raise RecognitionError(cats[-1].name, f"{what}: node '{cats[-1].name}' puts tokens after the patches; "
                                              "evc keeps class tokens only ahead of them")
    return sum(sizes[:-1])
