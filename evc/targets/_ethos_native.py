"""The Ethos-U lowering's rewrites: a copy of the Program's graph in forms Vela places on the NPU, value for value.

    lowered, rewrites = for_the_npu(program)      # the user's Program is left as it was
    rewrites                                     # {"softmax_rows": 5, "mean_flattened": 1}: nodes replaced

litert-torch lays a feature map out channels-last and carries that layout
through the ops after a convolution. Two ViT ops then reach Vela in forms it
leaves to the CPU (measured on EfficientFormerV2 at 64 × 64, docs/targets.md):

    softmax over the last axis of a (B, heads, N, N) map that a 1 × 1 conv (talking
      heads) wrote: in channels-last that axis is not the innermost, so the converter
      spells the softmax out (REDUCE_MAX, SUB, EXP, SUM, DIV), and the quantizer keeps
      EXP and REDUCE_MAX in float: DEQUANTIZE, float ops and DIV, all on the CPU.
      Rewritten as softmax over the rows of a 2-D view: one SOFTMAX, which the NPU runs.
    mean over (H, W) of a (B, C, H, W) map (global pooling): a MEAN over two axes,
      "Unsupported depth-reduction" on every Ethos-U unless one of them is 1.
      Rewritten as the mean over the last axis of the map flattened to (B, C, H·W).

Both give the same values as the ops they replace (PyTorch computes the same
sums in the same order); the tests check it.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.nn.functional as F


def softmax_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """softmax(x, dim) as a softmax over the rows of a 2-D view (the form the converter keeps as SOFTMAX)."""
    moved = x.movedim(dim, -1)
    return torch.softmax(moved.reshape(-1, moved.shape[-1]), -1).reshape(moved.shape).movedim(-1, dim)


def mean_flattened(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """x.mean((2, 3), keepdim) of a 4-D map, as a mean over one axis of the map flattened."""
    y = x.flatten(2).mean(-1)
    return y[..., None, None] if keepdim else y


def for_the_npu(program):
    """A Program like `program` whose graph (a copy) has every rewrite applied; and how many nodes each replaced."""
    graph = copy.deepcopy(program.graph)
    rewrites = {"softmax_rows": 0, "mean_flattened": 0}
    for node in list(graph.graph.nodes):
        replacement = _softmax(node) or _mean(node)
        if replacement is None:
            continue
        name, target, args = replacement
        with graph.graph.inserting_after(node):
            new = graph.graph.call_function(target, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.graph.erase_node(node)
        rewrites[name] += 1
    graph.recompile()
    return replace(program, graph=graph), rewrites


def _rank(node) -> int | None:
    meta = node.meta.get("tensor_meta") if hasattr(node, "meta") else None
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _argument(node, index: int, key: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(key, default)


def _softmax(node):
    """A softmax over one axis of a tensor of rank 3 or more (its dtype argument, if any, left as it was)."""
    if not (node.op == "call_method" and node.target == "softmax"
            or node.op == "call_function" and node.target in (torch.softmax, F.softmax)):
        return None
    x, dim = node.args[0], _argument(node, 1, "dim")
    if dim is None or node.kwargs.get("dtype") is not None or (_rank(x) or 0) < 3:
        return None
    return "softmax_rows", softmax_rows, (x, dim)


def _mean(node):
    """A mean over the last two axes of a 4-D map."""
    if not (node.op == "call_method" and node.target == "mean" or node.op == "call_function"
            and node.target is torch.mean):
        return None
    x, dims = node.args[0], _argument(node, 1, "dim")
    if _rank(x) != 4 or not isinstance(dims, (tuple, list)) or sorted(d % 4 for d in dims) != [2, 3] \
            or node.kwargs.get("dtype") is not None:
        return None
    return "mean_flattened", mean_flattened, (x, bool(_argument(node, 2, "keepdim", False)))
