"""Where the token count of a graph is fixed: what patch_slim and token_merge read on a model evc does not
recognise, to say which node stops them.

    token_count_fixed(gm)   # "node 'view' reshapes the 256 tokens of (1, 16, 256) into ...", or None
    require_tokens(program, "pass patch_slim")   # the recognised structure, or an error naming the node

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

from torch import fx

from evc.ir.residuals import residual_branches
from evc.ir.view import RecognitionError, node_shape

_RESHAPES = ("view", "reshape", "unflatten")


def require_tokens(program, what: str):
    """The recognised structure the token passes act on; else an error saying what in the graph fixes the
    token count, or, where nothing does, why evc does not recognise the blocks to act in."""
    if program.structure is not None:
        return program.structure
    reason = token_count_fixed(program.graph)
    if reason is not None:
        raise RecognitionError("", f"{what} cannot change this model's token count: {reason}")
    raise RecognitionError("", f"{what} changes token counts only in blocks evc recognises, and nothing else "
                               f"in this graph fixes them, but its blocks are not recognised: {program.unrecognised}")


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
