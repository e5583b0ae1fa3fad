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

from evc.ir.structure import Attention, Block, Mlp, Stage, Structure
from evc.ir.sublayers import sublayer
from evc.ir.view import RecognitionError, Residual, View, between, is_add, is_stream, is_tokens, node_shape

__all__ = ["RecognitionError", "recognise"]

_CATS = (torch.cat, torch.concat, torch.concatenate)
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def _residual(view: View, node: fx.Node, dim: int | None, grid: bool = False) -> Residual | None:
    """`node` as `x + f(x)` on tokens of width `dim` (see `is_stream`), or None. With dim None: on
    (B, N, C) tokens of any width, or, with `grid`, on any (B, H, W, C) of the same shape."""
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if not is_add(node) or len(operands) != 2:
        return None
    if dim is not None and not all(is_stream(a, dim) for a in operands):
        return None
    if dim is None and not all(is_tokens(a, None) or (grid and len(node_shape(a) or ()) == 4) for a in operands):
        return None
    if node_shape(operands[0]) != node_shape(operands[1]):
        return None
    skip, out = sorted(operands, key=view.order.__getitem__)
    if skip is out or out not in view.reached(skip, out):
        return None
    return Residual(skip, node, between(view, skip, node))


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
        frontier = [a for n in frontier for a in n.all_input_nodes if is_stream(a, dim) and a not in seen]
        if not frontier:
            return False
    return False


@dataclass(frozen=True)
class _Patches:
    node: fx.Node  # the Conv2d, or the Linear on flattened patches (einops' Rearrange, then Linear)
    dim: int
    size: tuple[int, int]
    grid: tuple[int, int]


def _patch_embed(view: View) -> _Patches:
    """The layer that makes the tokens: a Linear on the image's patches, or the last Conv2d of the
    stem before the first residual block on (B, N, C) tokens (one Conv2d with kernel equal to
    stride in a ViT; an overlapping one in PVT-v2; several in a convolutional stem)."""
    image = next(n for n in view.nodes if n.op == "placeholder")
    first = next((n for n in view.nodes if view.is_a(n, (nn.Conv2d, nn.Linear))), None)
    if first is None:
        message = f"the input '{image.name}' reaches no Conv2d; expected a patch-embedding Conv2d"
        raise RecognitionError(image.name, message)
    if view.is_a(first, nn.Linear):
        return _linear_patches(first, view.module(first), node_shape(image))
    residual = next((r for n in view.after(first) if (r := _residual(view, n, None)) is not None), None)
    if residual is None:
        message = (f"no residual add `x + f(x)` on a (B, N, C) token stream after node '{first.name}': "
                   "expected the blocks of a transformer")
        maps = next((r for n in view.after(first) if (r := _residual(view, n, None, grid=True)) is not None), None)
        if maps is not None:
            message += (f"; the residual adds from node '{maps.add.name}' on are on (B, C, H, W) feature maps, "
                        "which evc does not yet recognise as transformer blocks (EfficientViT-M, EfficientFormer-V2, "
                        "FastViT) nor compresses (CNNs)")
        raise RecognitionError(first.name, message)
    stem = [n for n in view.after(first, residual.skip) if view.is_a(n, nn.Conv2d)]
    last = next(n for n in reversed([first, *stem]) if residual.skip in view.reached(n))
    grid = node_shape(last)[-2:]
    size = tuple(i // g for i, g in zip(node_shape(image)[-2:], grid))
    return _Patches(last, node_shape(residual.skip)[-1], size, grid)


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


def _stream(view: View, conv: fx.Node, dim: int) -> list[Residual]:
    """The residual adds on the (B, N, dim) tokens after node `conv`, each on the one before."""
    first = next((r for n in view.after(conv) if (r := _residual(view, n, dim)) is not None), None)
    if first is None:
        message = f"no residual add `x + f(x)` on the (B, N, {dim}) token stream after node '{conv.name}'"
        raise RecognitionError(conv.name, message)
    return _stage_from(view, first, dim)


def _stage_from(view: View, first: Residual, dim: int) -> list[Residual]:
    """`first` and the residual adds on (B, N, dim) tokens after it that each follow the one before."""
    residuals = [first] + [r for n in view.after(first.add) if (r := _residual(view, n, dim)) is not None]
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


def _embedding(view: View, conv: fx.Node, start: fx.Node, dim: int) -> tuple[tuple[str, ...], str | None]:
    """Prefix tokens concatenated with the patch tokens, and the position embedding added."""
    from_patches = view.reached(conv, start)
    prefix, pos = [], None
    for node in view.after(conv, start):
        is_cat = node.op == "call_function" and node.target in _CATS
        operands = node.args[0] if is_cat else node.args[:2] if is_add(node) else ()
        sources = [_param_source(a) for a in operands if isinstance(a, fx.Node) and a not in from_patches]
        params = [s for s in sources if s is not None and node_shape(s) is not None and node_shape(s)[-1] == dim]
        if is_cat:
            prefix += [p.target for p in params if node_shape(p) == (1, 1, dim)]
        elif params and pos is None:
            pos = params[0].target
    return tuple(prefix), pos


def _blocks(view: View, start: fx.Node, stream: list[Residual], first: int = 0, prefix: int = 0,
            class_attention: bool = False, stage: int = 0) -> tuple[Block, ...]:
    """Pair sublayers into blocks: attention then MLP; either alone where a pass removed the other."""
    groups: list[list[tuple[Attention | Mlp, Residual]]] = []
    for r in stream:
        is_open = bool(groups) and len(groups[-1]) == 1 and isinstance(groups[-1][0][0], Attention)
        sub = sublayer(view, r, first + len(groups) - is_open)
        if isinstance(sub, Mlp) and is_open:
            groups[-1].append((sub, r))
        else:
            groups.append([(sub, r)])
    blocks, previous = [], start
    for i, group in enumerate(groups, first):
        attn = next((s for s, _ in group if isinstance(s, Attention)), None)
        mlp = next((s for s, _ in group if isinstance(s, Mlp)), None)
        tokens = math.prod(node_shape(group[0][1].skip)[1:-1])  # (B, N, C), or (B, H, W, C) on the grid
        nodes = view.after(previous, group[-1][1].add)
        fixed = () if class_attention else _fixed_tokens(view, nodes, (tokens, tokens - prefix))
        blocks.append(Block(i, attn, mlp, tokens, tuple(n.name for n in nodes), class_attention, fixed, stage))
        previous = group[-1][1].add
    return tuple(blocks)


def _fixed_tokens(view: View, nodes: list[fx.Node], counts: tuple[int, int]) -> tuple[str, ...]:
    """Constants the block reads with a token axis, (..., N, C): they hold one value per position."""
    constants = {a for n in nodes for a in n.all_input_nodes if view.is_constant(a)}
    fixed = [a for a in constants if len(node_shape(a)) >= 2 and node_shape(a)[-2] in counts]
    return tuple(sorted(a.name for a in fixed))


def _next_stage(view: View, last: fx.Node) -> tuple[list[Residual], int] | None:
    """The residual blocks of the next stage of a hierarchical model: after a downsampling of the
    stream ending at `last` to fewer, wider tokens (PVT, Swin), each on the one before."""
    reached, shape = view.reached(last), node_shape(last)
    tokens, dim = math.prod(shape[1:-1]), shape[-1]
    for node in view.after(last):
        r = _residual(view, node, None, grid=True)
        if r is None or r.skip not in reached:
            continue
        width, count = node_shape(r.skip)[-1], math.prod(node_shape(r.skip)[1:-1])
        # A stage is wider, or as wide on fewer tokens; a single token of the same width is a head's.
        if width != dim or count not in (tokens, 1):
            return _stage_from(view, r, width), width
    return None


def _is_class_token(node: fx.Node, dim: int) -> bool:
    """A (1, 1, D) parameter, or the same expanded over the batch: `cls_token.expand(B, -1, -1)`."""
    source = node if node.op == "get_attr" else node.args[0] if node.args else None
    return isinstance(source, fx.Node) and source.op == "get_attr" and node_shape(source) == (1, 1, dim)


def _class_stream(view: View, last: fx.Node, dim: int) -> list[Residual]:
    """CaiT's class-attention blocks: after the token stream, a class token (a parameter, not a
    token of the stream) gathers the tokens through residual blocks of its own."""
    first = next((r for n in view.after(last) if (r := _residual(view, n, dim)) is not None), None)
    return _stage_from(view, first, dim) if first is not None and _is_class_token(first.skip, dim) else []


def _module_of_norm(view: View, node: fx.Node) -> str | None:
    if view.is_a(node, _NORMS):
        return node.target
    weight = node.kwargs.get("weight") if node.target is F.layer_norm else None
    is_param = isinstance(weight, fx.Node) and weight.op == "get_attr"
    return weight.target.rpartition(".")[0] if is_param else None


def _is_map(node: fx.Node, dim: int) -> bool:
    """Tokens (B, N, dim), or the same laid out on their grid: (B, dim, H, W) or (B, H, W, dim)."""
    s = node_shape(node)
    return is_tokens(node, dim) or (s is not None and len(s) == 4 and dim in (s[1], s[3]))


def _pooling(view: View, last: fx.Node, tail: list[fx.Node], dim: int) -> tuple[fx.Node, str]:
    for node in tail:
        s = node_shape(node)
        if s is None or len(s) != 2 or not any(_is_map(a, dim) for a in node.all_input_nodes):
            continue
        index = node.args[1] if node.target is operator.getitem else None
        if isinstance(index, tuple) and len(index) == 2 and index[1] == 0:
            return node, "token"
        if node.target in ("mean", torch.mean):
            return node, "avg"
        message = f"expected pooling at node '{node.name}': x[:, 0] or a mean over tokens"
        raise RecognitionError(node.name, message)
    raise RecognitionError(last.name, f"no pooling of the tokens after node '{last.name}'")


def _head(view: View, last: fx.Node, dim: int) -> tuple[str | None, str, tuple[str, ...], int]:
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


def _returned(view: View, node: fx.Node) -> bool:
    """Whether the graph returns `node`'s value, through nothing but shape-keeping ops (a norm, an Identity)."""
    output = view.nodes[-1]
    reach = view.reached(node)
    return output in reach and all(node_shape(n) == node_shape(node) for n in reach if n is not output)


def recognise(gm: fx.GraphModule) -> Structure:
    """The ViT structure of a traced graph whose nodes carry `tensor_meta` (see `trace`)."""
    if not any("tensor_meta" in n.meta for n in gm.graph.nodes):
        raise ValueError("recognise needs the shapes that evc.ir.trace records")
    view = View(gm)
    patches = _patch_embed(view)
    dim = patches.dim
    stream = _stream(view, patches.node, dim)
    start = stream[0].skip
    prefix, pos = _embedding(view, patches.node, start, dim)
    blocks = _blocks(view, start, stream, prefix=len(prefix))
    stages = [Stage(0, dim, blocks[0].tokens, (0, len(blocks)))]
    class_stream = _class_stream(view, stream[-1].add, dim)
    while not class_stream and (next_stage := _next_stage(view, stream[-1].add)) is not None:
        stream, dim = next_stage
        first = len(blocks)
        blocks += _blocks(view, next_stage[0][0].skip, stream, first, stage=len(stages))
        stages.append(Stage(len(stages), dim, blocks[first].tokens, (first, len(blocks))))
    blocks += _blocks(view, stream[-1].add, class_stream, len(blocks), class_attention=True)
    norm, pool, head, num_classes = _head(view, (class_stream or stream)[-1].add, dim)
    return Structure(
        embed_dim=stages[0].dim,
        patch_embed=patches.node.target,
        patch_size=patches.size,
        grid=patches.grid,
        prefix_tokens=prefix,
        pos_embed=pos,
        blocks=blocks,
        norm=norm,
        pool=pool,
        head=head,
        num_classes=num_classes,
        stages=tuple(stages) if len(stages) > 1 else (),
    )
