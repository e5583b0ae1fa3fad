"""Recognise a Vision Transformer in a traced graph, from the graph alone.

    gm = trace(model, example)
    structure = recognise(gm)      # a Structure, or RecognitionError naming a node

Nothing here knows timm's classes. The walk follows the data: the Conv2d on
the image whose kernel equals its stride is the patch embedding; parameters
of shape (1, 1, D) concatenated with the patch tokens are prefix tokens; the
residual stream is the chain of adds `x + f(x)` on (B, N, D) tensors; a
branch with a softmax or scaled_dot_product_attention is attention, one with
Linear, activation, Linear is an MLP; an attention followed by an MLP is a
block. After the last residual come the norm, the pooling and the head.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from evc.errors import InputError
from evc.ir.structure import Attention, Block, Mlp, Structure

_ADDS = (operator.add, operator.iadd, torch.add)
_CATS = (torch.cat, torch.concat, torch.concatenate)
_SOFTMAX = (torch.softmax, F.softmax, torch.Tensor.softmax)
_RESHAPE_METHODS = ("reshape", "view", "unflatten")
_MATMULS = (operator.matmul, torch.matmul, torch.bmm, torch.einsum, "matmul", "bmm")
_ACT_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Hardswish, nn.Mish, nn.Tanh, nn.Sigmoid)
_ACT_FUNCTIONS = (F.gelu, F.relu, F.silu, F.hardswish, F.mish, torch.relu, torch.sigmoid, torch.tanh)
_ACT_METHODS = ("relu", "sigmoid", "tanh")
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


class RecognitionError(InputError):
    """The graph is not a ViT evc understands; `node` names where recognition stopped."""

    def __init__(self, node: str, message: str):
        self.node = node
        super().__init__(message)


@dataclass(frozen=True)
class _Residual:
    skip: fx.Node  # the stream entering the sublayer
    add: fx.Node  # `skip + branch`
    branch: tuple[fx.Node, ...]  # nodes on a path from skip to the add, in graph order


class _View:
    """A graph with its nodes numbered and its modules at hand."""

    def __init__(self, gm: fx.GraphModule):
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.modules = dict(gm.named_modules())

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def is_a(self, node: fx.Node, kind) -> bool:
        return isinstance(self.module(node), kind)

    def after(self, first: fx.Node, last: fx.Node | None = None) -> list[fx.Node]:
        """Nodes after `first` up to and including `last` (the graph's end by default)."""
        end = self.order[last] + 1 if last is not None else len(self.nodes)
        return self.nodes[self.order[first] + 1 : end]

    def reached(self, source: fx.Node, last: fx.Node | None = None) -> set[fx.Node]:
        """`source` and every node after it, up to `last`, computed from its value.

        Only tensors count: `cls_token.expand(x.shape[0], -1, -1)` uses x's shape, not x.
        """
        reach = {source}
        for node in self.after(source, last):
            if any(a in reach and "tensor_meta" in a.meta for a in node.all_input_nodes):
                reach.add(node)
        return reach


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _is_tokens(node: fx.Node, dim: int) -> bool:
    s = node_shape(node)
    return s is not None and len(s) == 3 and s[-1] == dim


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )


def _is_score(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target == "softmax"
    return node.op == "call_function" and (node.target in _SOFTMAX or _is_sdpa(node))


def _is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.scaled_dot_product_attention


def _end(view: _View, residual: _Residual) -> fx.Node:
    """The node a branch is named by in errors: its last Linear, else the add."""
    return next((n for n in reversed(residual.branch) if view.is_a(n, nn.Linear)), residual.add)


def _between(view: _View, source: fx.Node, sink: fx.Node) -> tuple[fx.Node, ...]:
    """Nodes on some path from `source` (excluded) to `sink` (included), in graph order."""
    reach = view.reached(source, sink)
    if sink not in reach:
        return ()
    keep = {sink}
    for node in reversed(view.after(source, sink)):
        if node in keep:
            keep.update(a for a in node.all_input_nodes if a in reach)
    return tuple(n for n in view.after(source, sink) if n in keep)


def _residual(view: _View, node: fx.Node, dim: int) -> _Residual | None:
    """`node` as `x + f(x)` on the token stream, or None."""
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if not _is_add(node) or len(operands) != 2 or not all(_is_tokens(a, dim) for a in operands):
        return None
    skip, out = sorted(operands, key=view.order.__getitem__)
    if skip is out or out not in view.reached(skip, out):
        return None
    return _Residual(skip, node, _between(view, skip, node))


def _follows(node: fx.Node, previous: fx.Node, dim: int) -> bool:
    """Whether `node` is `previous`, or comes from it through ops on the token stream.

    Ops that select or merge tokens (patch_slim, token_merge) may read the
    stream through several paths; each step back follows token-shaped inputs.
    """
    frontier, seen = [node], set()
    for _ in range(64):
        if previous in frontier:
            return True
        seen.update(frontier)
        frontier = [a for n in frontier for a in n.all_input_nodes if _is_tokens(a, dim) and a not in seen]
        if not frontier:
            return False
    return False


@dataclass(frozen=True)
class _Patches:
    node: fx.Node  # the Conv2d, or the Linear on flattened patches (einops' Rearrange, then Linear)
    dim: int
    size: tuple[int, int]
    grid: tuple[int, int]


def _patch_embed(view: _View) -> _Patches:
    image = next(n for n in view.nodes if n.op == "placeholder")
    first = next((n for n in view.nodes if view.is_a(n, (nn.Conv2d, nn.Linear))), None)
    if first is None:
        message = f"the input '{image.name}' reaches no Conv2d; expected a patch-embedding Conv2d"
        raise RecognitionError(image.name, message)
    m = view.module(first)
    if isinstance(m, nn.Linear):
        return _linear_patches(first, m, node_shape(image))
    if m.kernel_size != m.stride:
        raise RecognitionError(
            first.name,
            f"expected a patch-embedding Conv2d with kernel size equal to stride at node '{first.name}', "
            f"found kernel {tuple(m.kernel_size)} and stride {tuple(m.stride)}",
        )
    return _Patches(first, m.out_channels, tuple(m.kernel_size), node_shape(first)[-2:])


def _linear_patches(node: fx.Node, linear: nn.Linear, image: tuple[int, ...]) -> _Patches:
    """A Linear on the image cut into p x p patches: (B, N, p * p * C) with N = (H / p) * (W / p)."""
    _, channels, height, width = image
    tokens = node_shape(node)[1] if len(node_shape(node)) == 3 else 0
    p = math.isqrt(linear.in_features // channels)
    if p * p * channels != linear.in_features or (height // p) * (width // p) != tokens:
        raise RecognitionError(node.name, f"expected a patch embedding at node '{node.name}', the first layer on "
                                          f"the image: a Conv2d with kernel size equal to stride, or a Linear on "
                                          f"its p x p patches; found a Linear of {linear.in_features} inputs")
    return _Patches(node, linear.out_features, (p, p), (height // p, width // p))


def _stream(view: _View, conv: fx.Node, dim: int) -> list[_Residual]:
    residuals = [r for n in view.after(conv) if (r := _residual(view, n, dim)) is not None]
    if not residuals:
        message = f"no residual add `x + f(x)` on the (B, N, {dim}) token stream after node '{conv.name}'"
        raise RecognitionError(conv.name, message)
    stream = residuals[:1]
    for r in residuals[1:]:
        if _follows(r.skip, stream[-1].add, dim):  # adds nested inside a branch are not on the stream
            stream.append(r)
    return stream


def _param_source(node: fx.Node) -> fx.Node | None:
    """The get_attr a value is derived from through its first inputs (`cls_token.expand(B, -1, -1)`)."""
    while node.op != "get_attr":
        tensors = [a for a in node.all_input_nodes if node_shape(a) is not None]
        if node.op in ("placeholder", "output") or not tensors:
            return None
        node = tensors[0]
    return node


def _embedding(view: _View, conv: fx.Node, start: fx.Node, dim: int) -> tuple[tuple[str, ...], str | None]:
    """Prefix tokens concatenated with the patch tokens, and the position embedding added."""
    from_patches = view.reached(conv, start)
    prefix, pos = [], None
    for node in view.after(conv, start):
        is_cat = node.op == "call_function" and node.target in _CATS
        operands = node.args[0] if is_cat else node.args[:2] if _is_add(node) else ()
        sources = [_param_source(a) for a in operands if isinstance(a, fx.Node) and a not in from_patches]
        params = [s for s in sources if s is not None and node_shape(s) is not None and node_shape(s)[-1] == dim]
        if is_cat:
            prefix += [p.target for p in params if node_shape(p) == (1, 1, dim)]
        elif params and pos is None:
            pos = params[0].target
    return tuple(prefix), pos


def size_value(arg) -> int | None:
    """A reshape's size as a number: a literal, or a width read from a tensor's shape
    (`c` of `b, n, c = x.shape`), whose value `trace` recorded."""
    if isinstance(arg, fx.Node):
        arg = arg.meta.get("value")
    return arg if type(arg) is int else None


def _ints(value) -> list[int]:
    if isinstance(value, (tuple, list)):
        return [i for v in value for i in _ints(v)]
    return [] if size_value(value) is None else [size_value(value)]


def _carries_head_count(node: fx.Node, heads: int, head_dim: int) -> bool:
    """A reshape that sets the head count: by number (a literal, or a width read from a shape),
    or as the -1 it infers (Hugging Face's `view(b, n, -1, head_dim)`, which needs no rewrite)."""
    reshape = (node.op == "call_method" and node.target in _RESHAPE_METHODS) or node.target is torch.reshape
    if not reshape:
        return False
    if any(i in (heads, heads * head_dim) for i in _ints([*node.args[1:], *node.kwargs.values()])):
        return True
    sizes, shape = node.args[1:], node_shape(node)
    sizes = [size_value(a) for a in (sizes[0] if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else sizes)]
    if -1 not in sizes or shape is None or len(sizes) != len(shape):
        return False
    axis = sizes.index(-1)
    return shape[axis:axis + 2] == (heads, head_dim) or (axis == len(shape) - 1 and shape[-1] == heads * head_dim)


def _mixing(view: _View, residual: _Residual, score: fx.Node) -> fx.Node | None:
    """Where the attention weights meet v: sdpa itself, or the first matmul after the softmax."""
    if _is_sdpa(score):
        return score
    after = view.reached(score, residual.add)
    return next((n for n in view.after(score, residual.add) if n in after and n.target in _MATMULS), None)


def _attention(view: _View, residual: _Residual, score: fx.Node, index: int) -> Attention:
    where = f"block {index}: the attention branch ending at node '{_end(view, residual).name}'"
    mix = _mixing(view, residual, score)
    if mix is None:
        message = f"{where} never multiplies the weights of node '{score.name}' with v"
        raise RecognitionError(score.name, message)
    linears = [n for n in residual.branch if view.is_a(n, nn.Linear)]
    upstream = _between(view, residual.skip, mix)
    downstream = view.reached(mix, residual.add)
    qkv = [n for n in linears if n in upstream]
    proj = [n for n in linears if n in downstream]
    if not qkv:
        raise RecognitionError(score.name, f"{where} has no q/k/v Linear before node '{score.name}'")
    if len(proj) != 1:
        message = f"{where} has {len(proj)} Linears after node '{mix.name}', expected one output projection"
        raise RecognitionError(mix.name, message)
    s = node_shape(score)
    if s is None or len(s) < 4:
        message = f"{where}: node '{score.name}' has shape {s}, with no head axis (B, heads, N, ...)"
        raise RecognitionError(score.name, message)
    heads = s[-3]
    head_dim = view.module(proj[0]).in_features // heads
    splits = upstream + _between(view, mix, proj[0])
    head_count = tuple(n.name for n in splits if _carries_head_count(n, heads, head_dim))
    if not head_count:
        raise RecognitionError(score.name, f"{where} has no reshape or view by the head count {heads}")
    return Attention(tuple(n.target for n in qkv), proj[0].target, heads, head_dim, head_count, score.name,
                     mix.name, residual.add.name)


def _is_activation(view: _View, node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _ACT_METHODS
    return view.is_a(node, _ACT_MODULES) or (node.op == "call_function" and node.target in _ACT_FUNCTIONS)


def _mlp(view: _View, residual: _Residual, fc1: fx.Node, fc2: fx.Node, index: int) -> Mlp:
    act = next((n for n in _between(view, fc1, fc2) if _is_activation(view, n)), None)
    if act is None:
        where = f"block {index}: the MLP branch ending at node '{fc2.name}'"
        message = f"{where} has no activation after node '{fc1.name}'"
        raise RecognitionError(fc2.name, message)
    return Mlp(fc1.target, fc2.target, view.module(fc1).out_features, act.name, residual.add.name)


def _sublayer(view: _View, residual: _Residual, index: int) -> Attention | Mlp:
    scores = [n for n in residual.branch if _is_score(n)]
    linears = [n for n in residual.branch if view.is_a(n, nn.Linear)]
    end = _end(view, residual).name
    where = f"block {index}: the branch ending at node '{end}'"
    if len(scores) > 1:
        message = f"{where} has {len(scores)} softmax/attention nodes, expected one"
        raise RecognitionError(scores[1].name, message)
    if scores:
        return _attention(view, residual, scores[0], index)
    has_heads = any(len(node_shape(n) or ()) >= 4 for n in residual.branch)
    if len(linears) == 2 and not has_heads:
        return _mlp(view, residual, linears[0], linears[1], index)
    if len(linears) > 2 or has_heads:
        where = where.replace("the branch", "the attention branch")
        raise RecognitionError(end, f"{where} has no softmax or scaled_dot_product_attention")
    message = (
        f"{where} has {len(linears)} Linear(s) and no softmax; expected attention "
        "(softmax or scaled_dot_product_attention) or an MLP (Linear, activation, Linear)"
    )
    raise RecognitionError(end, message)


def _blocks(view: _View, start: fx.Node, stream: list[_Residual]) -> tuple[Block, ...]:
    """Pair sublayers into blocks: attention then MLP; either alone where a pass removed the other."""
    groups: list[list[tuple[Attention | Mlp, _Residual]]] = []
    for r in stream:
        is_open = bool(groups) and len(groups[-1]) == 1 and isinstance(groups[-1][0][0], Attention)
        sub = _sublayer(view, r, len(groups) - is_open)
        if isinstance(sub, Mlp) and is_open:
            groups[-1].append((sub, r))
        else:
            groups.append([(sub, r)])
    blocks, previous = [], start
    for i, group in enumerate(groups):
        attn = next((s for s, _ in group if isinstance(s, Attention)), None)
        mlp = next((s for s, _ in group if isinstance(s, Mlp)), None)
        first, last = group[0][1], group[-1][1]
        nodes = tuple(n.name for n in view.after(previous, last.add))
        blocks.append(Block(i, attn, mlp, node_shape(first.skip)[1], nodes))
        previous = last.add
    return tuple(blocks)


def _module_of_norm(view: _View, node: fx.Node) -> str | None:
    if view.is_a(node, _NORMS):
        return node.target
    weight = node.kwargs.get("weight") if node.target is F.layer_norm else None
    is_param = isinstance(weight, fx.Node) and weight.op == "get_attr"
    return weight.target.rpartition(".")[0] if is_param else None


def _pooling(view: _View, last: fx.Node, tail: list[fx.Node], dim: int) -> tuple[fx.Node, str]:
    for node in tail:
        s = node_shape(node)
        if s is None or len(s) != 2 or not any(_is_tokens(a, dim) for a in node.all_input_nodes):
            continue
        index = node.args[1] if node.target is operator.getitem else None
        if isinstance(index, tuple) and len(index) == 2 and index[1] == 0:
            return node, "token"
        if node.target in ("mean", torch.mean):
            return node, "avg"
        message = f"expected pooling at node '{node.name}': x[:, 0] or a mean over tokens"
        raise RecognitionError(node.name, message)
    raise RecognitionError(last.name, f"no pooling of the tokens after node '{last.name}'")


def _head(view: _View, last: fx.Node, dim: int) -> tuple[str | None, str, tuple[str, ...], int]:
    reach = view.reached(last)
    tail = [n for n in view.after(last) if n in reach]
    pool_node, pool = _pooling(view, last, tail, dim)
    norm = next((m for n in tail if (m := _module_of_norm(view, n)) is not None), None)
    heads = [n for n in tail if view.is_a(n, nn.Linear) and view.order[n] > view.order[pool_node]]
    if not heads and _returned(view, pool_node):  # a feature extractor (num_classes = 0, ViTModel)
        return norm, pool, (), 0
    if not heads:
        message = f"no classifier Linear after the pooling at node '{pool_node.name}'"
        raise RecognitionError(pool_node.name, message)
    return norm, pool, tuple(n.target for n in heads), view.module(heads[0]).out_features


def _returned(view: _View, node: fx.Node) -> bool:
    """Whether the graph returns `node`'s value, through nothing but shape-keeping ops (a norm, an Identity)."""
    output = view.nodes[-1]
    reach = view.reached(node)
    return output in reach and all(node_shape(n) == node_shape(node) for n in reach if n is not output)


def recognise(gm: fx.GraphModule) -> Structure:
    """The ViT structure of a traced graph whose nodes carry `tensor_meta` (see `trace`)."""
    if not any("tensor_meta" in n.meta for n in gm.graph.nodes):
        raise ValueError("recognise needs the shapes that evc.ir.trace records")
    view = _View(gm)
    patches = _patch_embed(view)
    dim = patches.dim
    stream = _stream(view, patches.node, dim)
    start = stream[0].skip
    prefix, pos = _embedding(view, patches.node, start, dim)
    norm, pool, head, num_classes = _head(view, stream[-1].add, dim)
    return Structure(
        embed_dim=dim,
        patch_embed=patches.node.target,
        patch_size=patches.size,
        grid=patches.grid,
        prefix_tokens=prefix,
        pos_embed=pos,
        blocks=_blocks(view, start, stream),
        norm=norm,
        pool=pool,
        head=head,
        num_classes=num_classes,
    )
