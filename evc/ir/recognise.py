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
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import fx, nn

from evc.ir.structure import Attention, Block, Local, Mlp, Stage, Structure
from evc.ir.sublayers import sublayer
from evc.ir.view import (
    CATS,
    RecognitionError,
    Residual,
    View,
    between,
    is_add,
    is_stream,
    is_tokens,
    node_shape,
    token_count,
)

__all__ = ["RecognitionError", "recognise"]

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def _residual(view: View, node: fx.Node, dim: int | None, grid: bool = False, axis: int = -1) -> Residual | None:
    """`node` as `x + f(x)` on tokens of width `dim` on `axis` (see `is_stream`), or None. With dim
    None: on (B, N, C) tokens of any width, or, with `grid`, on any 4-D maps of the same shape."""
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if not is_add(node) or len(operands) != 2:
        return None
    if dim is not None and not all(is_stream(a, dim, axis) for a in operands):
        return None
    if dim is None and not all(is_tokens(a, None) or (grid and len(node_shape(a) or ()) == 4) for a in operands):
        return None
    if node_shape(operands[0]) != node_shape(operands[1]):
        return None
    skip, out = sorted(operands, key=view.order.__getitem__)
    if skip is out or out not in view.reached(skip, out):
        return None
    return Residual(skip, node, between(view, skip, node))


def _follows(node: fx.Node, previous: fx.Node, dim: int, axis: int) -> bool:
    """Whether `node` is `previous`, or comes from it through ops on the token stream.

    Ops that select or merge tokens (patch_slim, token_merge) may read the
    stream through several paths; each step back follows token-shaped inputs.
    A feature map's stream keeps its shape: a strided conv to as many channels
    starts a stage.
    """
    def on_stream(a: fx.Node) -> bool:
        return is_stream(a, dim, axis) and (axis == -1 or node_shape(a) == node_shape(previous))

    frontier, seen = [node], set()
    for _ in range(64):
        if previous in frontier:
            return True
        seen.update(frontier)
        frontier = [a for n in frontier for a in n.all_input_nodes if on_stream(a) and a not in seen]
        if not frontier:
            return False
    return False


@dataclass(frozen=True)
class _Patches:
    node: fx.Node  # the Conv2d, or the Linear on flattened patches (einops' Rearrange, then Linear)
    dim: int
    size: tuple[int, int]
    grid: tuple[int, int]
    axis: int = -1  # the tokens' width axis: -1, or 1 where the blocks work on (B, C, H, W) maps


def _patch_embed(view: View) -> _Patches:
    """The layer that makes the tokens: a Linear on the image's patches, or the last Conv2d of the
    stem before the first residual block on (B, N, C) tokens (one Conv2d with kernel equal to
    stride in a ViT; an overlapping one in PVT-v2; several in a convolutional stem). A model with
    no such block whose blocks work on (B, C, H, W) maps (EfficientViT, FastViT) starts at the
    first residual block on them."""
    image = next(n for n in view.nodes if n.op == "placeholder")
    first = next((n for n in view.nodes if view.is_a(n, (nn.Conv2d, nn.Linear))), None)
    if first is None:
        message = f"the input '{image.name}' reaches no Conv2d; expected a patch-embedding Conv2d"
        raise RecognitionError(image.name, message)
    if view.is_a(first, nn.Linear):
        return _linear_patches(first, view.module(first), node_shape(image))
    tokens = next((r for n in view.after(first) if (r := _residual(view, n, None)) is not None), None)
    maps = next((r for n in view.after(first) if (r := _residual(view, n, None, grid=True))), None)
    candidates = [_patches(view, first, r) for r in (maps, tokens) if r is not None]
    if not candidates:
        message = f"no residual add `x + f(x)` after node '{first.name}': expected the blocks of a transformer"
        raise RecognitionError(first.name, message)
    # Blocks on feature maps start the model where they hold an MLP or attention (EfficientFormer's first
    # stages); where they do not (a ResNet stem before a ViT's tokens), they are part of the stem.
    maps_first = candidates[0].axis == 1 and (tokens is None or _transforms(view, maps, candidates[0].dim))
    return candidates[0] if maps_first else candidates[-1]


def _patches(view: View, first: fx.Node, residual: Residual) -> _Patches:
    """The patch embedding for blocks starting at `residual`: the last Conv2d of the stem before it."""
    image = next(n for n in view.nodes if n.op == "placeholder")
    stem = [n for n in view.after(first, residual.skip) if view.is_a(n, nn.Conv2d)]
    last = next(n for n in reversed([first, *stem]) if residual.skip in view.reached(n))
    grid = node_shape(last)[-2:]
    size = tuple(i // g for i, g in zip(node_shape(image)[-2:], grid))
    axis = 1 if _channels_first(view, last, residual.skip) else -1
    return _Patches(last, node_shape(residual.skip)[axis], size, grid, axis)


def _transforms(view: View, first: Residual, dim: int) -> bool:
    """Whether the stage of feature maps starting at `first` holds an MLP or attention."""
    try:
        return any(not isinstance(sublayer(view, r, 0, 1), Local) for r in _stage_from(view, first, dim, 1))
    except RecognitionError:
        return False


def _channels_first(view: View, conv: fx.Node, skip: fx.Node) -> bool:
    """Whether the stream at `skip` keeps the (B, C, H, W) layout of the Conv2d `conv`'s output:
    nothing between them moves an axis."""
    moves = ("permute", "transpose", "reshape", "view", "flatten", "movedim")
    path = between(view, conv, skip)
    return len(node_shape(skip)) == 4 and not any(
        n.target in moves or getattr(n.target, "__name__", "") in moves for n in path)


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


def _stream(view: View, conv: fx.Node, dim: int, axis: int) -> list[Residual]:
    """The residual adds on the tokens of width `dim` after node `conv`, each on the one before."""
    first = next((r for n in view.after(conv) if (r := _residual(view, n, dim, axis=axis)) is not None), None)
    if first is None:
        message = f"no residual add `x + f(x)` on the (B, N, {dim}) token stream after node '{conv.name}'"
        raise RecognitionError(conv.name, message)
    return _stage_from(view, first, dim, axis)


def _stage_from(view: View, first: Residual, dim: int, axis: int = -1) -> list[Residual]:
    """`first` and the residual adds on tokens of width `dim` after it that each follow the one before."""
    residuals = [first] + [r for n in view.after(first.add) if (r := _residual(view, n, dim, axis=axis))]
    stream = residuals[:1]
    for r in residuals[1:]:
        if _follows(r.skip, stream[-1].add, dim, axis):  # adds nested inside a branch are not on the stream
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
        is_cat = node.op == "call_function" and node.target in CATS
        operands = node.args[0] if is_cat else node.args[:2] if is_add(node) else ()
        sources = [_param_source(a) for a in operands if isinstance(a, fx.Node) and a not in from_patches]
        params = [s for s in sources if s is not None and node_shape(s) is not None and node_shape(s)[-1] == dim]
        if is_cat:
            prefix += [p.target for p in params if node_shape(p) == (1, 1, dim)]
        elif params and pos is None:
            pos = params[0].target
    return tuple(prefix), pos


def _blocks(view: View, start: fx.Node, stream: list[Residual], first: int = 0, prefix: int = 0,
            class_attention: bool = False, stage: int = 0, axis: int = -1) -> tuple[Block, ...]:
    """Pair sublayers into blocks: attention then MLP; either alone where a pass removed the other.
    Branches that mix tokens by convolution (`Local`) join the block they sit in: EfficientViT's
    dw, ffn, attention, dw, ffn is two blocks, dw + ffn, then attention + dw + ffn."""
    groups: list[list[tuple[Attention | Mlp | Local, Residual]]] = []
    waiting: list[tuple[Local, Residual]] = []
    for r in stream:
        is_open = bool(groups) and any(isinstance(s, Attention) for s, _ in groups[-1]) and not any(
            isinstance(s, Mlp) for s, _ in groups[-1])
        sub = sublayer(view, r, first + len(groups) - is_open, axis)
        if isinstance(sub, Local):
            (groups[-1] if is_open else waiting).append((sub, r))
        elif isinstance(sub, Mlp) and is_open:
            groups[-1].append((sub, r))
        else:
            groups.append([*waiting, (sub, r)])
            waiting = []
    if waiting:  # conv mixers after the stage's last MLP
        groups[-1:] = [[*groups[-1], *waiting]] if groups else [waiting]
    blocks, previous = [], start
    for i, group in enumerate(groups, first):
        attn = next((s for s, _ in group if isinstance(s, Attention)), None)
        mlp = next((s for s, _ in group if isinstance(s, Mlp)), None)
        local = tuple(s for s, _ in group if isinstance(s, Local))
        tokens = token_count(node_shape(group[0][1].skip), axis)
        nodes = view.after(previous, group[-1][1].add)
        fixed = () if class_attention else _fixed_tokens(view, nodes, (tokens, tokens - prefix))
        blocks.append(Block(i, attn, mlp, tokens, tuple(n.name for n in nodes), class_attention, fixed, stage,
                            local))
        previous = group[-1][1].add
    return tuple(blocks)


def _fixed_tokens(view: View, nodes: list[fx.Node], counts: tuple[int, int]) -> tuple[str, ...]:
    """Constants the block reads with a token axis, (..., N, C): they hold one value per position."""
    constants = {a for n in nodes for a in n.all_input_nodes if view.is_constant(a)}
    fixed = [a for a in constants if len(node_shape(a)) >= 2 and node_shape(a)[-2] in counts]
    return tuple(sorted(a.name for a in fixed))


def _next_stage(view: View, last: fx.Node, axis: int) -> tuple[list[Residual], int, int] | None:
    """The residual blocks of the next stage of a hierarchical model, their width and its axis: after
    a downsampling of the stream ending at `last` to fewer, wider tokens (PVT, Swin, EfficientViT)."""
    reached, shape = view.reached(last), node_shape(last)
    tokens, dim = token_count(shape, axis), shape[axis]
    for node in view.after(last):
        r = _residual(view, node, None, grid=True)
        if r is None or r.skip not in reached:
            continue
        s = node_shape(r.skip)
        next_axis = axis if len(s) == 4 else -1
        width, count = s[next_axis], token_count(s, next_axis)
        # A stage is wider, or as wide on fewer tokens; a single token of the same width is a head's.
        # The same tokens flattened from maps (EfficientFormer's last stage) go on in the same stage.
        if width != dim or count not in (tokens, 1) or (count == tokens and len(s) < len(shape)):
            return _stage_from(view, r, width, next_axis), width, next_axis
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


def _is_map(node: fx.Node) -> bool:
    """Tokens (B, N, C), or the same laid out on their grid: (B, C, H, W) or (B, H, W, C)."""
    return len(node_shape(node) or ()) in (3, 4)


_POOLS = (F.adaptive_avg_pool2d, F.avg_pool2d, torch.mean, "mean")


def _pooled(view: View, node: fx.Node) -> bool:
    """A (B, C) view of maps averaged to (B, C, 1, 1): `adaptive_avg_pool2d(x, 1).flatten(1)`."""
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    shape = node_shape(source) if source is not None else None
    return (shape is not None and len(shape) == 4 and math.prod(shape[2:]) == 1
            and (source.target in _POOLS or view.is_a(source, (nn.AdaptiveAvgPool2d, nn.AvgPool2d))))


def _pooling(view: View, last: fx.Node, tail: list[fx.Node]) -> tuple[fx.Node, str]:
    for node in tail:
        s = node_shape(node)
        if s is None or len(s) != 2 or not any(_is_map(a) for a in node.all_input_nodes):
            continue
        index = node.args[1] if node.target is operator.getitem else None
        if isinstance(index, tuple) and len(index) == 2 and index[1] == 0:
            return node, "token"
        if node.target in ("mean", torch.mean) or _pooled(view, node):
            return node, "avg"
        message = f"expected pooling at node '{node.name}': x[:, 0] or a mean over tokens"
        raise RecognitionError(node.name, message)
    raise RecognitionError(last.name, f"no pooling of the tokens after node '{last.name}'")


def _head(view: View, last: fx.Node, dim: int) -> tuple[str | None, str, tuple[str, ...], int]:
    reach = view.reached(last)
    tail = [n for n in view.after(last) if n in reach]
    pool_node, pool = _pooling(view, last, tail)
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
    dim, axis = patches.dim, patches.axis
    stream = _stream(view, patches.node, dim, axis)
    start = stream[0].skip
    prefix, pos = _embedding(view, patches.node, start, dim)
    blocks = _blocks(view, start, stream, prefix=len(prefix), axis=axis)
    stages = [Stage(0, dim, blocks[0].tokens, (0, len(blocks)))]
    class_stream = _class_stream(view, stream[-1].add, dim) if axis == -1 else []
    while not class_stream and (next_stage := _next_stage(view, stream[-1].add, axis)) is not None:
        stream, dim, axis = next_stage
        first = len(blocks)
        flattened = dim == stages[-1].dim and token_count(node_shape(stream[0].skip), axis) == blocks[-1].tokens
        blocks += _blocks(view, stream[0].skip, stream, first, stage=len(stages) - flattened, axis=axis)
        if flattened:  # maps become (B, N, C) tokens mid-stage
            stages[-1] = replace(stages[-1], blocks=(stages[-1].blocks[0], len(blocks)))
        else:
            stages.append(Stage(len(stages), dim, blocks[first].tokens, (first, len(blocks))))
    if not any(b.attn or b.mlp for b in blocks):
        raise RecognitionError(patches.node.name, (
            f"the residual blocks after node '{patches.node.name}' hold no attention (a softmax) and no MLP "
            "(a Linear or 1 x 1 Conv2d, an activation, another): a convolutional network, which evc lowers but "
            "does not compress"))
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
