"""Ops put into a graph: token passes insert ops traced from evc.passes.tokens, copied in as plain torch
calls, so the model still needs no evc.

    out = reroute(gm, stream, merge, [keys])       # every later reader of `stream` reads merge's output
    probs = attention_probs(gm, attn)              # sdpa spelled out as MatMul and Softmax first
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
from torch import fx

from evc.errors import InputError
from evc.ir.structure import Attention
from evc.ir.view import is_sdpa, node_shape


def inline(gm: fx.GraphModule, fn: Callable, inputs: Sequence[fx.Node], after: fx.Node):
    """Trace `fn` (a function of tensors) and insert its ops right after node `after`,
    reading `inputs`; returns the node, or tuple of nodes, it outputs."""
    sub = fx.symbolic_trace(fn)
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_before(after.next):
        return gm.graph.graph_copy(sub.graph, dict(zip(placeholders, inputs)))


def reroute(gm: fx.GraphModule, stream: fx.Node, fn: Callable, inputs: Sequence[fx.Node] = ()):
    """Send the token stream leaving node `stream` through fn(stream, *inputs): every later
    reader of `stream` reads fn's output (its first, if a tuple) instead. Returns fn's output."""
    before = set(gm.graph.nodes)
    out = inline(gm, fn, [stream, *inputs], stream)
    new = set(gm.graph.nodes) - before
    stream.replace_all_uses_with(out[0] if isinstance(out, tuple) else out,
                                 delete_user_cb=lambda user: user not in new)
    return out


def node_named(gm: fx.GraphModule, name: str) -> fx.Node:
    """The node of `gm`'s graph called `name` (the names a Structure holds)."""
    return next(n for n in gm.graph.nodes if n.name == name)


def attention_probs(gm: fx.GraphModule, attn: Attention) -> fx.Node:
    """The softmax node of `attn`'s weights, (B, heads, N, N)."""
    return probs_at(gm, attn.score_node)


def probs_at(gm: fx.GraphModule, score: str) -> fx.Node:
    """The softmax node of the attention whose score node is `score` (a softmax, or a fused
    scaled_dot_product_attention, first spelled out as MatMul and Softmax)."""
    node = node_named(gm, score)
    return spell_out_attention(gm, node) if is_sdpa(node) else node


def spell_out_attention(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Replace the scaled_dot_product_attention `node` by MatMul and Softmax, as inference
    computes it; returns the new softmax node."""
    from evc.passes import tokens
    q, k, v, mask, scale = _sdpa_args(node)
    scale = scale or node_shape(q)[-1] ** -0.5
    if mask is None:
        context, probs = inline(gm, lambda q, k, v: tokens.attention(q, k, v, scale), [q, k, v], node)
    else:
        spelled = lambda q, k, v, bias: tokens.attention(q, k, v, scale, bias)  # noqa: E731
        context, probs = inline(gm, spelled, [q, k, v, mask], node)
    node.replace_all_uses_with(context)
    gm.graph.erase_node(node)
    return probs


def _sdpa_args(node: fx.Node) -> tuple:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    given = {**dict(zip(names, node.args)), **node.kwargs}
    if given.get("is_causal") or given.get("enable_gqa"):
        raise InputError(f"node '{node.name}': causal or grouped-query attention in an image model")
    mask = given.get("attn_mask")
    is_float = isinstance(mask, fx.Node) and mask.meta.get("tensor_meta") is not None and \
        mask.meta["tensor_meta"].dtype.is_floating_point
    if mask is not None and not is_float:
        raise InputError(f"node '{node.name}': an attention mask evc cannot spell out (only a float tensor)")
    return given["query"], given["key"], given["value"], mask, given.get("scale")


def attention_keys(gm: fx.GraphModule, probs: fx.Node, where: str) -> fx.Node:
    """The transposed keys, (B, heads, head_dim, N), of the logits matmul under the softmax `probs`."""
    node = probs.args[0]
    for _ in range(6):
        if node.op == "call_function" and node.target in (operator.matmul, torch.matmul):
            return node.args[1]
        tensors = [a for a in node.all_input_nodes if len(node_shape(a) or ()) == 4]
        if len(tensors) != 1:
            break
        node = tensors[0]
    raise InputError(f"{where}: cannot find the matmul of queries and keys under node '{probs.name}'")


def add_attention_bias(gm: fx.GraphModule, probs: fx.Node, bias: fx.Node) -> None:
    """Add `bias`, broadcast to (B, heads, N, N), to the logits the softmax `probs` normalises."""
    logits = probs.args[0]
    with gm.graph.inserting_before(probs):
        biased = gm.graph.call_function(operator.add, (logits, bias))
    probs.args = (biased, *probs.args[1:])


def sharing_weights(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` with its own graph (same node names) and the same modules: cheap, for
    edits that add ops but change no module."""
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return fx.GraphModule(gm, graph)


def features(gm: fx.GraphModule, head: tuple[str, ...]) -> fx.GraphModule:
    """A copy of `gm` whose output is what its classifier Linear(s) read, concatenated: the final features.
    Without a classifier (a feature extractor) the output is the features already."""
    gm = sharing_weights(gm)
    if not head:
        return gm
    graph = gm.graph
    inputs = [n.args[0] for n in graph.nodes if n.op == "call_module" and n.target in head]
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        output.args = (graph.call_function(torch.cat, (inputs, -1)),)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm
