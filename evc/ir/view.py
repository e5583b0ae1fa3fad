"""A traced graph as recognition reads it: nodes in order, modules at hand, shapes, paths.

    view = View(gm)
    view.is_a(node, nn.Linear)         # the module a call_module node calls
    view.reached(source, last)         # what is computed from `source`'s value
    between(view, source, sink)        # the nodes on some path from one to the other
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from evc.errors import InputError

ADDS = (operator.add, operator.iadd, torch.add)
CATS = (torch.cat, torch.concat, torch.concatenate)
_SOFTMAX = (torch.softmax, F.softmax, torch.Tensor.softmax)


class RecognitionError(InputError):
    """The graph is not a ViT evc understands; `node` names where recognition stopped."""

    def __init__(self, node: str, message: str):
        self.node = node
        super().__init__(message)


@dataclass(frozen=True)
class Residual:
    skip: fx.Node  # the stream entering the sublayer
    add: fx.Node  # `skip + branch`
    branch: tuple[fx.Node, ...]  # nodes on a path from skip to the add, in graph order


class View:
    """A graph with its nodes numbered and its modules at hand."""

    def __init__(self, gm: fx.GraphModule):
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.modules = dict(gm.named_modules())
        image = next(n for n in self.nodes if n.op == "placeholder")
        self.from_image = self.reached(image, tensors_only=False)

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def is_a(self, node: fx.Node, kind) -> bool:
        return isinstance(self.module(node), kind)

    def after(self, first: fx.Node, last: fx.Node | None = None) -> list[fx.Node]:
        """Nodes after `first` up to and including `last` (the graph's end by default)."""
        end = self.order[last] + 1 if last is not None else len(self.nodes)
        return self.nodes[self.order[first] + 1 : end]

    def reached(self, source: fx.Node, last: fx.Node | None = None, tensors_only: bool = True) -> set[fx.Node]:
        """`source` and every node after it, up to `last`, computed from its value.

        Only tensors count unless told otherwise: `cls_token.expand(x.shape[0], -1, -1)` uses
        x's shape, not x.
        """
        reach = {source}
        for node in self.after(source, last):
            if any(a in reach and (not tensors_only or "tensor_meta" in a.meta) for a in node.all_input_nodes):
                reach.add(node)
        return reach

    def is_constant(self, node: fx.Node) -> bool:
        """A tensor computed from the model's weights alone, not from the image or its shape."""
        return node not in self.from_image and node_shape(node) is not None


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def size_value(arg) -> int | None:
    """A reshape's size as a number: a literal, or a width read from a tensor's shape
    (`c` of `b, n, c = x.shape`), whose value `trace` recorded."""
    if isinstance(arg, fx.Node):
        arg = arg.meta.get("value")
    return arg if type(arg) is int else None


def is_tokens(node: fx.Node, dim: int | None) -> bool:
    """A (B, N, dim) tensor; any width for dim None."""
    s = node_shape(node)
    return s is not None and len(s) == 3 and (dim is None or s[-1] == dim)


def is_stream(node: fx.Node, dim: int, axis: int = -1) -> bool:
    """Tokens of width `dim` on `axis`: (B, N, dim), or laid out on their grid channels-last,
    (B, H, W, dim) (Swin); with axis 1, a feature map (B, dim, H, W) (EfficientViT, FastViT)."""
    s = node_shape(node)
    return s is not None and len(s) in ((3, 4) if axis == -1 else (4,)) and s[axis] == dim


def token_count(shape: tuple[int, ...], axis: int = -1) -> int:
    """How many tokens a stream tensor of this shape holds: all axes but the batch and the width."""
    return math.prod(s for i, s in enumerate(shape[1:], 1) if i != axis % len(shape))


def is_dense(view: View, node: fx.Node) -> bool:
    """A Linear, or a Conv2d acting as one on a feature map: 1 x 1, stride 1, one group."""
    module = view.module(node)
    if isinstance(module, nn.Conv2d):
        return module.kernel_size == (1, 1) and module.stride == (1, 1) and module.groups == 1
    return isinstance(module, nn.Linear)


def widths(layer: nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of a Linear or a Conv2d."""
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels, layer.out_channels
    return layer.in_features, layer.out_features


def is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.scaled_dot_product_attention


def is_score(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target == "softmax"
    return node.op == "call_function" and (node.target in _SOFTMAX or is_sdpa(node))


def between(view: View, source: fx.Node, sink: fx.Node) -> tuple[fx.Node, ...]:
    """Nodes on some path from `source` (excluded) to `sink` (included), in graph order."""
    reach = view.reached(source, sink)
    if sink not in reach:
        return ()
    keep = {sink}
    for node in reversed(view.after(source, sink)):
        if node in keep:
            keep.update(a for a in node.all_input_nodes if a in reach)
    return tuple(n for n in view.after(source, sink) if n in keep)


def last_linear(view: View, residual: Residual) -> fx.Node:
    """The node a branch is named by in errors: its last Linear (or 1 x 1 Conv2d), else the add."""
    return next((n for n in reversed(residual.branch) if is_dense(view, n)), residual.add)
