"""Fold what a layer computes from its weights alone into weights, as inference sees them.

    fold_constants(gm)
    constant_nodes(gm.graph)          # the nodes computed from weights and literals alone
    constant_value(gm, node)          # one such node's value

- A Linear whose bias is computed, `F.linear(x, self.qkv.weight, torch.cat((q_bias, k_bias, v_bias)))`
  (BEiT, EVA), becomes an ordinary Linear holding that bias: q/k/v is then one
  Linear whose rows head_prune slices like any other.
- A constant added to attention logits, or given to scaled_dot_product_attention
  as its mask (BEiT's relative position bias, gathered from its table), becomes
  one buffer beside the attention, (1, heads, N, N): its head axis is sliced
  with the heads.

Both are exact in eval mode: the values are what the model computes on every
call. The model stays an ordinary module that runs without evc.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

_LINEARS = (F.linear, torch.ops.aten.linear.default)
_SOFTMAX = (torch.softmax, F.softmax, torch.Tensor.softmax, "softmax")


def fold_constants(gm: fx.GraphModule) -> None:
    constant = constant_nodes(gm.graph)
    changed = False
    for node in list(gm.graph.nodes):
        if node.target in _LINEARS:
            changed |= _fold_linear(gm, node, constant)
        else:
            for value in _logit_terms(gm, node):
                if value in constant and value.op != "get_attr":
                    _fold_buffer(gm, value, "attention_bias")
                    changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()


def constant_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes computed from weights and literals alone: not from the input, nor its shape."""
    variable, constant = set(), set()
    for node in graph.nodes:
        if node.op in ("placeholder", "output") or any(a in variable for a in node.all_input_nodes):
            variable.add(node)
        elif node.op in ("get_attr", "call_function", "call_method"):
            constant.add(node)
        else:
            variable.add(node)  # a module call: left to recognition as the layer it is
    return constant


def _fold_linear(gm: fx.GraphModule, node: fx.Node, constant: set[fx.Node]) -> bool:
    given = {**dict(zip(("input", "weight", "bias"), node.args)), **node.kwargs}
    weight, bias = given.get("weight"), given.get("bias")
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and isinstance(bias, fx.Node)):
        return False
    if bias not in constant or bias.op == "get_attr":
        return False
    owner = weight.target.rpartition(".")[0]
    w = gm.get_parameter(weight.target)
    linear = nn.Linear(w.shape[1], w.shape[0])
    linear.weight = w
    linear.bias = nn.Parameter(constant_value(gm, bias).detach(), requires_grad=w.requires_grad)
    name = owner if _replaceable(_submodule(gm, owner)) else _free(gm, f"{owner}.linear")
    gm.set_submodule(name, linear)
    with gm.graph.inserting_before(node):
        node.replace_all_uses_with(gm.graph.call_module(name, (given["input"],)))
    gm.graph.erase_node(node)
    return True


def _mixes_heads(layer: nn.Module, x) -> bool:
    """A square Linear or 1 x 1 Conv2d: talking heads, the one layer the logits may pass before the softmax."""
    square = isinstance(layer, nn.Linear) and layer.in_features == layer.out_features
    pointwise = isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.in_channels == layer.out_channels
    return (square or pointwise) and isinstance(x, fx.Node)


def _logit_terms(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """What is added to attention logits at `node`: sdpa's mask, or the operands of the adds a softmax
    reads through views (Swin adds its bias, views by window, adds its shift mask, views back) and
    layers that mix the heads (EfficientFormerV2 adds its bias, then mixes heads by a 1 x 1 conv)."""
    if node.target is F.scaled_dot_product_attention:
        mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
        return [mask] if isinstance(mask, fx.Node) else []
    if node.target not in _SOFTMAX or not isinstance(node.args[0], fx.Node):
        return []
    terms, logits = [], node.args[0]
    for _ in range(8):
        if logits.target in (operator.add, torch.add):
            operands = [a for a in logits.args[:2] if isinstance(a, fx.Node)]
            terms += operands
            logits = operands[0]
        elif logits.op == "call_method" and logits.target in ("view", "reshape", "permute") and logits.args:
            logits = logits.args[0]
        elif logits.op == "call_module" and _mixes_heads(gm.get_submodule(logits.target), logits.args[0]):
            logits = logits.args[0]
        else:
            break
    return terms


def _fold_buffer(gm: fx.GraphModule, value: fx.Node, leaf: str) -> None:
    tensor = constant_value(gm, value)
    if tensor.dtype == torch.bool:
        return
    # Named by the layer whose weights it comes from; tracing's own `_tensor_constant`s say nothing.
    owner = _common_owner([n.target for n in _ancestors(value) if n.op == "get_attr" and "." in n.target])
    name = _free(gm, f"{owner}.{leaf}" if owner else leaf)
    parent, _, attr = name.rpartition(".")
    (gm.get_submodule(parent) if parent else gm).register_buffer(attr, tensor.detach().clone())
    with gm.graph.inserting_before(value):
        folded = gm.graph.get_attr(name)
    value.replace_all_uses_with(folded)


def _ancestors(node: fx.Node) -> list[fx.Node]:
    seen, frontier = {node}, [node]
    while frontier:
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen]
        seen.update(frontier)
    return list(seen)


def constant_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The value of a constant node, computed by the nodes it comes from alone."""
    needed = set(_ancestors(node))
    graph, env = fx.Graph(), {}
    for n in gm.graph.nodes:
        if n in needed:
            env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(env[node])
    with torch.no_grad():
        return fx.GraphModule(gm, graph)()


def _common_owner(targets: list[str]) -> str:
    """The deepest module holding all `targets`: 'blocks.0.attn' for its table and index."""
    owners = [t.rpartition(".")[0].split(".") for t in targets]
    common: list[str] = []
    for parts in zip(*owners):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _replaceable(module: nn.Module | None) -> bool:
    """The weight's owner is the layer itself: a Linear, or the bare holder torch.export's capture made."""
    return isinstance(module, nn.Linear) or (type(module) is nn.Module and not list(module.children()))


def _submodule(gm: fx.GraphModule, name: str) -> nn.Module | None:
    try:
        return gm.get_submodule(name)
    except AttributeError:
        return None


def _free(gm: fx.GraphModule, name: str) -> str:
    """`name`, or `name_1`, `name_2`... where `gm` has something called so already."""
    owner, _, leaf = name.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    candidate, i = leaf, 0
    while hasattr(module, candidate):
        i += 1
        candidate = f"{leaf}_{i}"
    return f"{owner}.{candidate}" if owner else candidate
