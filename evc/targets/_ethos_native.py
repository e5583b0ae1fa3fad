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

One more rewrite is for speed, not placement:

    a patchifying convolution (kernel = stride, no padding: a ViT's patch embedding)
      over few input channels: Vela runs it on the NPU, but a 16 × 16 kernel over 3
      channels uses the MAC array poorly (deit_small's was 16% of the U55's cycles for
      1% of its MACs). Rewritten as the patches cut out (reshape, transpose) and one
      FULLY_CONNECTED over them, the form the Linear layers already run in: 158 → 6 ms
      on the U55-128, 23 → 1.8 ms on the U65-256, 31 → 23 ms on the U85-256 (deit_small's
      patch embedding and a LayerNorm, Vela's estimate; docs/targets.md).

The first two give the same values as the ops they replace, bit for bit for a
softmax over the last axis and a mean (PyTorch computes the same sums in the
same order), within float rounding for a softmax over another axis; the
patches' sums run in another order, so within float rounding too. The tests
check each.
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


def patches_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kernel: tuple[int, int]):
    """conv2d(x, weight, bias, stride=kernel) with no padding, as one Linear over the cut-out patches."""
    b, c, height, width = x.shape
    (kh, kw), h, w = kernel, height // kernel[0], width // kernel[1]
    patches = x.reshape(b, c, h, kh, w, kw).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * kh * kw)
    y = F.linear(patches, weight.reshape(weight.shape[0], -1), bias)
    return y.reshape(b, h, w, -1).permute(0, 3, 1, 2)


def for_the_npu(program):
    """A Program like `program` whose graph (a copy) has every rewrite applied; and how many nodes each replaced."""
    graph = copy.deepcopy(program.graph)
    rewrites = {"softmax_rows": 0, "mean_flattened": 0, "patches_linear": 0}
    for node in list(graph.graph.nodes):
        replacement = _softmax(node) or _mean(node) or _patches(graph, node)
        if replacement is None:
            continue
        name, target, args = replacement
        if name == "patches_linear":  # the convolution's own weights, read where they live
            x, (weight, bias), kernel = args
            with graph.graph.inserting_before(node):
                args = (x, graph.graph.get_attr(weight), graph.graph.get_attr(bias) if bias else None, kernel)
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


def _patches(graph, node):
    """A Conv2d module that cuts its input into whole patches: kernel = stride, at least 2 × 2 (a 1 × 1 conv is
    already a matrix product to Vela), no padding, dilation or groups, and a known input size its kernel divides."""
    if node.op != "call_module":
        return None
    conv = graph.get_submodule(node.target)
    if not isinstance(conv, torch.nn.Conv2d) or conv.kernel_size != conv.stride or min(conv.kernel_size) < 2 \
            or conv.groups != 1 \
            or conv.dilation != (1, 1) or conv.padding not in ((0, 0), "valid") or conv.padding_mode != "zeros":
        return None
    meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], torch.fx.Node) else None
    shape = getattr(meta, "shape", None)
    if shape is None or len(shape) != 4 or shape[2] % conv.kernel_size[0] or shape[3] % conv.kernel_size[1]:
        return None
    bias = f"{node.target}.bias" if conv.bias is not None else None
    return "patches_linear", patches_linear, (node.args[0], (f"{node.target}.weight", bias), tuple(conv.kernel_size))
