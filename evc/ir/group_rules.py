"""How each op couples channels, one small rule an op family, for `evc.ir.groups`.

    rule = RULES["add"]                 # by a call's name: torch.add, operator.add, Tensor.add
    axes = rule(flow, node)             # the index spaces of the node's axes, its inputs' joined
    rule = module_rule(nn.Linear(4, 8)) # by a module's type

A rule reads its inputs' spaces in `flow.axes`, joins them (`flow.union`),
splits them (`flow.spaces.split`) or marks them (`flow.mark`, `flow.freeze`),
and returns a list of spaces, one an axis of the node's value (a tuple of such
lists for a tuple of tensors). A rule that returns None, or spaces that do not
fit the node's shape, leaves the node to the rule for unknown ops: its inputs'
channels are frozen, naming it. Attention's ops (matmul, einsum, softmax,
scaled_dot_product_attention) have theirs in `evc.ir.attention_rules`.
"""

from __future__ import annotations

import math

from torch import fx, nn

from evc.ir.view import node_shape


def _tensor(arg) -> bool:
    return isinstance(arg, fx.Node) and node_shape(arg) is not None


def _name(node: fx.Node) -> str:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return name.split(".")[0]  # aten's overloads: linalg_vector_norm.default


def _arg(node: fx.Node, index: int, name: str, default=None):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _dims(node: fx.Node, index: int, rank: int, name: str = "dim") -> list[int] | None:
    dims = _arg(node, index, name)
    if dims is None:
        return None
    return [d % rank for d in ((dims,) if isinstance(dims, int) else dims)]


def size_args(node: fx.Node) -> list:
    """The sizes a reshape or view is given: `x.view(B, N, 3, -1)` or `x.reshape((B, N, 3, -1))`."""
    sizes = node.args[1:] if node.op == "call_method" else node.args[1:2]
    return list(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else list(sizes)


def pointwise(flow, node: fx.Node) -> list[int]:
    """Broadcast operands (an add, a mul, an activation): axes of one size from the right are one space.
    An add of two values computed from the input is a residual: its channels are the stream's."""
    shape = node_shape(node)
    out: list[int | None] = [None] * len(shape)
    operands = [a for a in node.all_input_nodes if _tensor(a)]
    for arg in operands:
        for i, space in enumerate(reversed(flow.axes[arg]), 1):
            if flow.spaces.size[space] == shape[-i] > 1:
                out[-i] = space if out[-i] is None else (flow.union(out[-i], space) or out[-i])
    residual = _name(node) in ("add", "iadd", "add_") and sum(a in flow.live for a in operands) > 1
    for space in out:
        if residual and space is not None:
            flow.mark(space, "residual", f"the residual add at node '{node.name}'")
    return [s if s is not None else flow.spaces.new(n) for s, n in zip(out, shape)]


def passthrough(flow, node: fx.Node) -> list[int]:
    return list(flow.axes[node.args[0]])


def reshape(flow, node: fx.Node) -> list[int]:
    """Align the axes of equal products: one to one is the same space, one to several splits it
    (how heads are found), several to one is their product; size arguments are remembered."""
    x = node.args[0]
    src, dst, axes = node_shape(x), node_shape(node), flow.axes[x]
    out = [None] * len(dst)
    ins = [i for i, n in enumerate(src) if n > 1]
    outs = [j for j, n in enumerate(dst) if n > 1]
    while ins or outs:
        a, b = [ins.pop(0)], [outs.pop(0)]
        while _prod(src, a) != _prod(dst, b):
            (a.append(ins.pop(0)) if _prod(src, a) < _prod(dst, b) else b.append(outs.pop(0)))
        if len(a) == 1:
            parts = [axes[a[0]]] if len(b) == 1 else flow.fresh(dst[j] for j in b)
            if len(b) > 1:
                flow.spaces.split(axes[a[0]], "product", parts)
        elif len(b) == 1:
            parts = [flow.spaces.new(dst[b[0]])]
            flow.spaces.split(parts[0], "product", [axes[i] for i in a])
        else:
            flow.freeze([axes[i] for i in a], f"node '{node.name}' reshapes {len(a)} axes into {len(b)}")
            parts = flow.fresh(dst[j] for j in b)
        for j, part in zip(b, parts):
            out[j] = part
    out = [s if s is not None else flow.spaces.new(n) for s, n in zip(out, dst)]
    if _name(node) in ("view", "reshape"):
        sizes = size_args(node)
        for j, size in enumerate(sizes if len(sizes) == len(dst) else ()):
            if isinstance(size, fx.Node) and not isinstance(size.meta.get("value"), int):
                flow.freeze([out[j]], f"node '{node.name}' reshapes by a size computed from data")
            elif size != -1 and not _follows(flow, size, out[j]) and not _sized_by_factor(flow, size, out[j]):
                flow.sizes.append((node.name, j, out[j]))
                for read in _read_axes(flow, size):
                    flow.pins.append((node.name, j, read, out[j], size.meta["value"]))
    elif _name(node) == "unflatten":  # x.unflatten(dim, (heads, -1)): its sizes name axes dim, dim + 1, ...
        dim = _arg(node, 1, "dim") % len(src)
        for k, size in enumerate(_arg(node, 2, "sizes")):
            if isinstance(size, int) and size != -1:
                flow.sizes.append((node.name, k, out[dim + k]))
    return out


def _follows(flow, size, space: int) -> bool:
    """`x.reshape(B, ...)` with `B = x.shape[0]` read from the very axis it sizes: it follows any cut."""
    reads = _read_axes(flow, size)
    find = flow.spaces.find
    return len(reads) == 1 and find(reads[0]) == find(space) and size.meta.get("value") == flow.spaces.size[space]


def _sized_by_factor(flow, size, space: int) -> bool:
    """`x.reshape(3, B * num_heads, N, -1)` with B read from a tensor: the literal factor counts the
    trailing factors of the axis (the heads), and is the size rewritten, so B still follows the batch."""
    if not (isinstance(size, fx.Node) and _name(size) == "mul" and len(size.args) == 2 and isinstance(size.args[1], int)
            and len(size.users) == 1):
        return False
    spaces, split = flow.spaces, flow.spaces.parts(space)
    parts = split[1] if split and split[0] == "product" else (spaces.find(space),)
    leading = {leaf for read in _read_axes(flow, size.args[0]) for leaf in spaces.coords(read)
               if spaces.size[leaf] > 1}  # a batch of one at trace time is no factor
    for k in range(len(parts)):
        if (math.prod(spaces.size[p] for p in parts[k:]) == size.args[1]
                and leading == {leaf for p in parts[:k] for leaf in spaces.coords(p)}):
            trailing = parts[k] if k == len(parts) - 1 else spaces.new(size.args[1])
            if trailing not in parts:
                spaces.split(trailing, "product", parts[k:])
            flow.sizes.append((size.name, 0, trailing))
            return True
    return False


def _read_axes(flow, size) -> list[int]:
    """The tensor axes a size argument is computed from (`x.size(3)`, `C // heads` with `C = x.shape[-1]`):
    it changes at run time with them, so cutting them must pin it to its value (twins reads the window
    size from the heads axis, which has the same size)."""
    if not isinstance(size, fx.Node) or _tensor(size):
        return []
    if size.op == "call_method" and size.target == "size" and _tensor(size.args[0]):
        axes = flow.axes.get(size.args[0]) or []
        dim = _arg(size, 1, "dim")
        return list(axes) if dim is None else [axes[dim % len(axes)]] if axes else []
    if _name(size) == "getitem" and isinstance(size.args[1], int):
        source = size.args[0]
        if _tensor(source) or not isinstance(source, fx.Node):
            return []
        if _name(source) == "getattr" or (source.op == "call_method" and source.target == "size"):
            axes = flow.axes.get(source.args[0]) or []
            return [axes[size.args[1]]] if axes else []
    return [a for arg in size.all_input_nodes for a in _read_axes(flow, arg)]


def _prod(shape, axes) -> int:
    return math.prod(shape[i] for i in axes)


def permute(flow, node: fx.Node) -> list[int]:
    axes = flow.axes[node.args[0]]
    dims = size_args(node) if node.op == "call_method" else list(_arg(node, 1, "dims"))
    return [axes[d % len(axes)] for d in dims]


def transpose(flow, node: fx.Node) -> list[int]:
    axes = list(flow.axes[node.args[0]])
    if node.target == "t":
        return axes[::-1]
    i, j = (d % len(axes) for d in (_arg(node, 1, "dim0"), _arg(node, 2, "dim1")))
    axes[i], axes[j] = axes[j], axes[i]
    return axes


def expand(flow, node: fx.Node) -> list[int]:
    """expand, repeat: an axis of size 1 becomes a new one; repeating a wider axis freezes it."""
    x = node.args[0]
    src, dst, axes = node_shape(x), node_shape(node), flow.axes[x]
    out = []
    for j, n in enumerate(dst):
        i = j - (len(dst) - len(src))
        if i >= 0 and src[i] == n:
            out.append(axes[i])
        else:
            if i >= 0 and src[i] > 1:
                flow.freeze([axes[i]], f"node '{node.name}' repeats it")
            out.append(flow.spaces.new(n))
    return out


def cat(flow, node: fx.Node) -> list[int]:
    tensors = _arg(node, 0, "tensors")
    rank = len(node_shape(node))
    dim = (_arg(node, 1, "dim", 0)) % rank
    first = flow.axes[tensors[0]]
    for t in tensors[1:]:
        for i in range(rank):
            if i != dim:
                flow.union(first[i], flow.axes[t][i])
    joined = flow.spaces.new(node_shape(node)[dim])
    flow.spaces.split(joined, "concat", [flow.axes[t][dim] for t in tensors])
    return [joined if i == dim else s for i, s in enumerate(first)]


def split(flow, node: fx.Node) -> tuple:
    """split, chunk, unbind: the axis is the concatenation of the parts; equal parts of chunk or of
    a split by one size are one space (they stay equal); unbind indexes the axis, which freezes it."""
    x, name = node.args[0], _name(node)
    axes, shapes = flow.axes[x], [tuple(m.shape) for m in node.meta["tensor_meta"]]
    dim = _arg(node, 1 if name == "unbind" else 2, "dim", 0) % len(axes)
    if name == "unbind":
        flow.freeze([axes[dim]], f"node '{node.name}' takes its entries one by one")
        return tuple(axes[:dim] + axes[dim + 1:] for _ in shapes)
    parts = [flow.spaces.new(s[dim]) for s in shapes]
    flow.spaces.split(axes[dim], "concat", parts)
    by = _arg(node, 1, "split_size_or_sections" if name == "split" else "chunks")
    if isinstance(by, (list, tuple)):
        flow.sizes.extend((node.name, k, part) for k, part in enumerate(parts))
    else:
        for part in parts[1:]:
            flow.union(parts[0], part)
    return tuple(axes[:dim] + [part] + axes[dim + 1:] for part in parts)


def stack(flow, node: fx.Node) -> list[int]:
    tensors = _arg(node, 0, "tensors")
    dim = _arg(node, 1, "dim", 0) % len(node_shape(node))
    first = flow.axes[tensors[0]]
    for t in tensors[1:]:
        for a, b in zip(first, flow.axes[t]):
            flow.union(a, b)
    stacked = flow.spaces.new(len(tensors))
    flow.freeze([stacked], f"node '{node.name}' stacks {len(tensors)} tensors along it")  # their count is fixed
    return first[:dim] + [stacked] + first[dim:]


def getitem(flow, node: fx.Node):
    x, index = node.args
    axes = flow.axes[x]
    if isinstance(axes, tuple):
        return axes[index]
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        fill = len(axes) - sum(i is not None for i in index) + 1
        index = index[:at] + (slice(None),) * fill + index[at + 1:]
    gathers = [k for k, item in enumerate(index) if _tensor(item)]
    if gathers:
        return _gather(flow, node, axes, index, gathers)
    out, i = [], 0
    for item in index:
        if item is None:
            out.append(flow.spaces.new(1))
            continue
        if item != slice(None):
            flow.freeze([axes[i]], f"node '{node.name}' indexes it")
            if isinstance(item, slice):  # what a slice's bounds pick cannot narrow either
                out.append(flow.spaces.new(node_shape(node)[len(out)]))
                flow.freeze(out[-1:], f"node '{node.name}' slices it")
        else:
            out.append(axes[i])
        i += 1
    out += axes[i:]
    shape = node_shape(node)
    return [s if s is not None else flow.spaces.new(n) for s, n in zip(out, shape)] if len(out) == len(shape) else None


def reduce(flow, node: fx.Node) -> list[int]:
    """sum drops its axes; mean, max and the like depend on how many entries there are: they freeze them."""
    axes = flow.axes[node.args[0]]
    at = 2 if _name(node) == "linalg_vector_norm" else 1  # aten's norm: (x, ord, dim, keepdim)
    dims = _dims(node, at, len(axes)) or list(range(len(axes)))
    if _name(node) != "sum":
        flow.freeze([axes[d] for d in dims], f"node '{node.name}' reduces over it")
    keep = _arg(node, at + 1, "keepdim", False)
    out = [flow.spaces.new(1) if i in dims else s for i, s in enumerate(axes) if keep or i not in dims]
    return out if hasattr(node.meta["tensor_meta"], "shape") else (out, list(out))  # max(x, dim): values, indices


def spatial(flow, node: fx.Node) -> list[int]:
    """Pooling, interpolation, padding on (B, C, ...): an axis that keeps its size keeps its space."""
    x = node.args[0]
    return [s if flow.spaces.size[s] == n and i < 2 else flow.spaces.new(n)
            for i, (s, n) in enumerate(zip(flow.axes[x], node_shape(node)))]


def pad(flow, node: fx.Node) -> list[int]:
    x = node.args[0]
    return [s if flow.spaces.size[s] == n else flow.spaces.new(n) for s, n in zip(flow.axes[x], node_shape(node))]


def roll(flow, node: fx.Node) -> list[int]:
    axes = flow.axes[node.args[0]]
    flow.freeze([axes[d] for d in (_dims(node, 2, len(axes), "dims") or range(len(axes)))],
                f"node '{node.name}' rolls it")
    return list(axes)


def index(flow, node: fx.Node) -> list[int] | None:
    """aten's `index.Tensor(x, [None, idx])`, as torch.export records `x[:, idx]`."""
    x, indices = node.args
    items = tuple(slice(None) if i is None else i for i in indices)
    items += (slice(None),) * (len(flow.axes[x]) - len(items))
    gathers = [k for k, item in enumerate(items) if _tensor(item)]
    return _gather(flow, node, flow.axes[x], items, gathers) if gathers else None


def _gather(flow, node: fx.Node, axes: list[int], index: tuple, gathers: list[int]) -> list[int] | None:
    """`table[:, index]`, `bias[index.view(-1)]`: one axis picked by a tensor of positions. The entries it
    picks are fixed, so that axis freezes; the index's axes take its place and the others carry through
    (a relative position table's heads axis stays the heads')."""
    if len(gathers) > 1 or any(item != slice(None) for k, item in enumerate(index) if k not in gathers):
        return None
    at = gathers[0]
    flow.freeze([axes[at]], f"node '{node.name}' gathers along it")
    return axes[:at] + list(flow.axes[index[at]]) + axes[at + 1:]


def linear_function(flow, node: fx.Node) -> list[int]:
    x, w = flow.axes[node.args[0]], flow.axes[_arg(node, 1, "weight")]
    flow.union(x[-1], w[1])
    bias = _arg(node, 2, "bias")
    if _tensor(bias):
        flow.union(flow.axes[bias][0], w[0])
    return x[:-1] + [w[0]]


def norm_function(flow, node: fx.Node) -> list[int]:
    """F.layer_norm, F.group_norm, F.batch_norm: per-channel tensors join the channel axis; the first
    two normalise over it."""
    x = flow.axes[node.args[0]]
    name = _name(node)
    axis = x[-1] if name == "layer_norm" else x[1]
    for arg in node.all_input_nodes[1:]:
        if _tensor(arg):
            flow.union(flow.axes[arg][0], axis)
    if name != "batch_norm":
        flow.mark(axis, "norm", f"the norm at node '{node.name}'")
    return list(x)


_POINTWISE = ("add sub mul truediv div iadd isub imul itruediv add_ sub_ mul_ div_ rsub pow maximum minimum "
              "where masked_fill gelu relu relu_ silu sigmoid sigmoid_ tanh hardswish hardsigmoid mish "
              "leaky_relu softplus dropout contiguous clone neg exp abs float half to type_as erf sqrt rsqrt "
              "detach sin cos log reciprocal square clamp clamp_min clamp_max clip floordiv mod gelu_ elu")
RULES = {
    **{name: pointwise for name in _POINTWISE.split()},
    **{name: reshape for name in ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze")},
    **{name: expand for name in ("expand", "expand_as", "repeat")},
    **{name: split for name in ("split", "chunk", "unbind")},
    **{name: reduce for name in ("mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp",
                                 "linalg_vector_norm")},
    **{name: spatial for name in ("adaptive_avg_pool2d", "adaptive_max_pool2d", "avg_pool2d", "max_pool2d",
                                  "adaptive_avg_pool1d", "avg_pool1d", "max_pool1d", "interpolate", "upsample")},
    "permute": permute, "transpose": transpose, "swapaxes": transpose, "t": transpose,
    "stack": stack, "cat": cat, "concat": cat, "concatenate": cat, "getitem": getitem, "index": index,
    "pad": pad, "roll": roll, "linear": linear_function,
    "layer_norm": norm_function, "group_norm": norm_function, "batch_norm": norm_function,
}


def linear(flow, node: fx.Node) -> list[int]:
    layer = flow.gm.get_submodule(node.target)
    x = flow.axes[node.args[0]]
    flow.union(x[-1], flow.param(f"{node.target}.weight", 1, layer.in_features))
    out = flow.param(f"{node.target}.weight", 0, layer.out_features)
    flow.module_params(layer, node.target, {"bias": 0}, out)
    return x[:-1] + [out]


def conv(flow, node: fx.Node) -> list[int]:
    """Conv2d: one group joins input channels with the weight's columns; depthwise joins them with its
    outputs (one filter each); other groupings freeze both."""
    layer = flow.gm.get_submodule(node.target)
    x, weight = flow.axes[node.args[0]], f"{node.target}.weight"
    if layer.groups == 1:
        flow.union(x[1], flow.param(weight, 1, layer.in_channels))
        out = flow.param(weight, 0, layer.out_channels)
    elif layer.groups == layer.in_channels == layer.out_channels:
        out = x[1]
        flow.union(out, flow.param(weight, 0, layer.out_channels))
        flow.sizes.append((node.target, "groups", out))  # one group a channel: their count goes with them
    else:
        out = flow.param(weight, 0, layer.out_channels)
        flow.freeze([x[1], out], f"node '{node.name}' is a convolution of {layer.groups} groups")
    flow.module_params(layer, node.target, {"bias": 0}, out)
    positions = flow.fresh(node_shape(node)[2:])
    flow.freeze(x[2:] + positions, f"node '{node.name}' convolves over it")  # a constant image's too
    return [x[0], out] + positions


def layer_norm(flow, node: fx.Node) -> list[int]:
    """LayerNorm over its trailing axes, or over axis 1 for the channels-first kind (timm's LayerNorm2d)."""
    layer = flow.gm.get_submodule(node.target)
    x, shape, k = flow.axes[node.args[0]], node_shape(node.args[0]), len(layer.normalized_shape)
    first = tuple(shape[-k:]) != tuple(layer.normalized_shape) or "2d" in type(layer).__name__.lower()
    axes = [x[1]] if first and k == 1 else x[-k:]
    for dim, axis in enumerate(axes):
        flow.module_params(layer, node.target, {"weight": dim, "bias": dim}, axis)
        flow.mark(axis, "norm", f"the norm at node '{node.name}'")
    return list(x)


def channel_norm(flow, node: fx.Node) -> list[int]:
    """GroupNorm and BatchNorm: per-channel tensors on axis 1; GroupNorm normalises over it too."""
    layer = flow.gm.get_submodule(node.target)
    x = flow.axes[node.args[0]]
    flow.module_params(layer, node.target, dict.fromkeys(("weight", "bias", "running_mean", "running_var"), 0), x[1])
    if isinstance(layer, nn.GroupNorm):
        flow.mark(x[1], "norm", f"the norm at node '{node.name}'")
    return list(x)


_MODULES = [
    (nn.Linear, linear), (nn.Conv2d, conv), (nn.LayerNorm, layer_norm),
    ((nn.GroupNorm, nn.modules.batchnorm._BatchNorm), channel_norm),
    ((nn.GELU, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish,
      nn.LeakyReLU, nn.ELU, nn.Dropout, nn.Identity), passthrough),
    ((nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample), spatial),
    (nn.Flatten, reshape),
]


def module_rule(module: nn.Module):
    return next((rule for kind, rule in _MODULES if isinstance(module, kind)), None)
