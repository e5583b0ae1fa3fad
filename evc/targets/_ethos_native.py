"""The Ethos-U lowering's rewrites: a copy of the Program's graph in forms Vela places on the NPU, value for value.

    lowered, rewrites = for_the_npu(program, "u55_128")  # the user's Program is left as it was
    rewrites               # {"softmax_rows": 5, "pool_depthwise": 3, ...}: the nodes, or chains, replaced

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

Two more rewrites are for speed, not placement:

    a patchifying convolution (kernel = stride, no padding: a ViT's patch embedding)
      over few input channels: Vela runs it on the NPU, but a 16 × 16 kernel over 3
      channels uses the MAC array poorly (deit_small's was 16% of the U55's cycles for
      1% of its MACs). Rewritten as the patches cut out (reshape, transpose) and one
      FULLY_CONNECTED over them, the form the Linear layers already run in: 158 → 6 ms
      on the U55-128, 23 → 1.8 ms on the U65-256, 31 → 23 ms on the U85-256 (deit_small's
      patch embedding and a LayerNorm, Vela's estimate; docs/targets.md).
    a pooling token mixer (PoolFormer's, EfficientFormer's): x + γ·(avg_pool3×3(x) − x),
      AVERAGE_POOL_2D, SUB, MUL and ADD over the whole map, each paid in full on the
      U55/U65 at widths no pruning pass cuts (22% of efficientformer_l1's U55 cycles).
      Per channel it is one 3 × 3 window: a·x + b·mean of the window, a = 1 − γ,
      b = γ. Rewritten as depthwise convolutions with those weights: one over the
      map's interior, and, where the pool leaves padding out of its mean
      (count_include_pad = False), one per edge and corner, whose windows are
      cropped as the pool's are, concatenated back: 905 k → 284 k U55 cycles for
      one 56 × 56 × 48 mixer (Vela's estimate; docs/targets.md). The chain is
      matched as far as it goes: a pool minus its input; times a per-channel
      constant; plus that input. The U85 alone keeps the pool: it chains elementwise
      ops into the one before, so there the four cost less than the convolutions
      (efficientformer_l1: 12.3 ms as the pool, 14.0 ms as convolutions).

The first two give the same values as the ops they replace, bit for bit for a
softmax over the last axis and a mean (PyTorch computes the same sums in the
same order), within float rounding for a softmax over another axis; the
patches' and the windows' sums run in another order, so within float rounding
too. The tests check each.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import replace

import torch
import torch.nn.functional as F

from evc.ir.constants import constant_nodes, constant_value
from evc.ir.view import node_shape


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


def pool_blend(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    """a·x + b·avg_pool2d(x, 3, 1, 1) per channel, as depthwise convolutions whose weights (`window_weights`) hold
    a and b: one padded convolution when the pool counts its padding; else one over the interior and one for each
    edge and corner, over the window the pool sees there (its padding left out), concatenated back."""
    groups = x.shape[1]
    if len(weights) == 1:
        return F.conv2d(x, weights[0], padding=1, groups=groups)
    inner, top, bottom, left, right, top_left, top_right, bottom_left, bottom_right = weights
    up, down = x[:, :, :2], x[:, :, -2:]
    rows = ((up[..., :2], top_left), (up, top), (up[..., -2:], top_right)), \
        ((x[..., :2], left), (x, inner), (x[..., -2:], right)), \
        ((down[..., :2], bottom_left), (down, bottom), (down[..., -2:], bottom_right))
    return torch.cat([torch.cat([F.conv2d(part, w, groups=groups) for part, w in row], -1) for row in rows], -2)


def window_weights(a: torch.Tensor, b: torch.Tensor, counts_padding: bool) -> tuple[torch.Tensor, ...]:
    """pool_blend's weights for per-channel a and b (shape (C,)): each window's b / its size, and a at the place
    of the output pixel in it."""
    def window(height, width, row, column):
        w = (b / (height * width))[:, None, None].repeat(1, height, width)
        w[:, row, column] += a
        return w[:, None]

    if counts_padding:
        return (window(3, 3, 1, 1),)
    return (window(3, 3, 1, 1), window(2, 3, 0, 1), window(2, 3, 1, 1), window(3, 2, 1, 0), window(3, 2, 1, 1),
            window(2, 2, 0, 0), window(2, 2, 0, 1), window(2, 2, 1, 0), window(2, 2, 1, 1))


# The NPUs (by a spec's `npu` prefix) whose elementwise ops each cost a pass over the map: there a pooling mixer
# is cheaper as depthwise convolutions.
POOL_AS_DEPTHWISE = ("u55", "u65")


def for_the_npu(program, npu: str):
    """A Program like `program` whose graph (a copy) has every rewrite for `npu` (a spec's name: u55_128, ...)
    applied; and how many nodes, or chains of nodes, each replaced."""
    graph = copy.deepcopy(program.graph)
    matchers = [_softmax, _mean, lambda node: _patches(graph, node)]
    if npu.startswith(POOL_AS_DEPTHWISE):
        constants = constant_nodes(graph.graph)
        matchers.append(lambda node: _pool_mixer(graph, node, constants))
    rewrites = {"softmax_rows": 0, "mean_flattened": 0, "patches_linear": 0, "pool_depthwise": 0}
    erased = set()  # the inside of each chain replaced
    for node in list(graph.graph.nodes):
        if node in erased:
            continue
        replacement = next((found for match in matchers if (found := match(node)) is not None), None)
        if replacement is None:
            continue
        name, target, args, last = replacement
        with graph.graph.inserting_before(node):  # constants (a rewrite's own weights) become the graph's buffers
            args = tuple(_buffer(graph, name, a) if isinstance(a, torch.Tensor) else a for a in args)
        with graph.graph.inserting_after(last):
            new = graph.graph.call_function(target, args)
        new.meta = dict(last.meta)
        last.replace_all_uses_with(new)
        _erase_unused(graph.graph, last, erased)
        rewrites[name] += 1
    graph.delete_all_unused_submodules()
    graph.recompile()
    return replace(program, graph=graph), rewrites


def _erase_unused(graph, node, erased: set) -> None:
    """Erase `node` if nothing uses it, then each of its inputs left unused, adding each to `erased`: what a
    rewrite replaced, and the constants only it read. (Not all dead code: a user's unused in-place op is not dead.)"""
    if node.users or node.op == "placeholder":
        return
    inputs = node.all_input_nodes
    graph.erase_node(node)
    erased.add(node)
    for used in inputs:
        _erase_unused(graph, used, erased)


def _buffer(graph, name: str, value: torch.Tensor):
    """A get_attr node reading `value`, kept as a new buffer of `graph`."""
    key = f"_npu_{name}_{sum(1 for _ in graph.buffers())}"
    graph.register_buffer(key, value.detach().clone())
    return graph.graph.get_attr(key)


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
    return "softmax_rows", softmax_rows, (x, dim), node


def _mean(node):
    """A mean over the last two axes of a 4-D map."""
    if not (node.op == "call_method" and node.target == "mean" or node.op == "call_function"
            and node.target is torch.mean):
        return None
    x, dims = node.args[0], _argument(node, 1, "dim")
    if _rank(x) != 4 or not isinstance(dims, (tuple, list)) or sorted(d % 4 for d in dims) != [2, 3] \
            or node.kwargs.get("dtype") is not None:
        return None
    return "mean_flattened", mean_flattened, (x, bool(_argument(node, 2, "keepdim", False))), node


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
    return "patches_linear", patches_linear, (node.args[0], conv.weight, conv.bias, tuple(conv.kernel_size)), node


_SUB, _MUL, _ADD = (operator.sub, torch.sub), (operator.mul, torch.mul), (operator.add, torch.add)
_PASS_THROUGH = (torch.nn.Identity, torch.nn.Dropout)  # in eval; and timm's DropPath, by name


def _pool_mixer(graph, node, constants: set):
    """avg_pool2d(x, 3, 1, 1) − x (a module AvgPool2d), then as much of `· γ` (γ a per-channel constant) and
    `x + ·` as follows it, each the only user of the one before: (name, pool_blend, (x, *weights), last node)."""
    if not (node.op == "call_function" and node.target in _SUB and not node.kwargs and len(node.args) == 2):
        return None
    pooled, x = node.args
    if not (isinstance(pooled, torch.fx.Node) and pooled.op == "call_module" and pooled.args == (x,)
            and len(pooled.users) == 1):
        return None
    pool = graph.get_submodule(pooled.target)
    if not isinstance(pool, torch.nn.AvgPool2d) or any(
            _pair(v) != want for v, want in ((pool.kernel_size, (3, 3)), (pool.stride, (1, 1)),
                                             (pool.padding, (1, 1)))) or pool.ceil_mode or pool.divisor_override:
        return None
    shape = node_shape(x) if isinstance(x, torch.fx.Node) else None
    if shape is None or len(shape) != 4 or min(shape[2:]) < 3:
        return None
    channels = shape[1]
    a, b, last = -torch.ones(channels), torch.ones(channels), node
    while len(last.users) == 1:
        (user,) = last.users
        if user.op == "call_module" and _passes_through(graph.get_submodule(user.target)):
            last = user
        elif user.op == "call_function" and user.target in _MUL and not user.kwargs and len(user.args) == 2 \
                and user.args.count(last) == 1 \
                and (gamma := _per_channel(graph, constants, user.args[user.args[0] is last], channels)) is not None:
            a, b, last = a * gamma, b * gamma, user
        elif user.op == "call_function" and user.target in _ADD and not user.kwargs \
                and sorted(map(id, user.args)) == sorted((id(x), id(last))):
            a, last = a + 1, user
            break
        else:
            break
    return "pool_depthwise", pool_blend, (x, *window_weights(a, b, pool.count_include_pad)), last


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _passes_through(module) -> bool:
    return isinstance(module, _PASS_THROUGH) or type(module).__name__ == "DropPath" and not module.training


def _per_channel(graph, constants: set, value, channels: int) -> torch.Tensor | None:
    """`value`'s (C,) per-channel factors, if it is a number or a constant node (`constants`: computed from the
    graph's attributes alone) that broadcasts over (1, C, H, W) along the channels only; else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        constant = torch.tensor(value)
    elif isinstance(value, torch.fx.Node) and value in constants:
        constant = torch.as_tensor(constant_value(graph, value))
    else:
        return None
    try:
        full = torch.broadcast_shapes(constant.shape, (1, channels, 1, 1))
    except RuntimeError:
        return None
    return constant.float().broadcast_to(full).reshape(channels) if full == (1, channels, 1, 1) else None
