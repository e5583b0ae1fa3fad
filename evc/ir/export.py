"""Capture with torch.export where torch.fx cannot trace, in the vocabulary torch.fx records.

torch.fx's symbolic tracing stops at control flow on its proxies (Hugging Face
models) and at libraries that dispatch on the tensor type (einops).
torch.export runs the model on real tensors instead, and records every ATen
op it calls. Its graph is then written back as torch.fx would have traced it,
so recognition and surgery read one vocabulary:

    gm = exported(model, example, "ViTForImageClassification")
    # aten.linear on a weight     -> call_module Linear (named as the weight was: 'vit.layers.0.q_proj')
    # aten.conv2d / aten.layer_norm -> call_module Conv2d / LayerNorm
    # aten.view, aten.reshape     -> x.reshape(...)       aten.add -> operator.add, ...
    # aten.dropout in eval, export's guard check -> removed

The batch is left dynamic, so the model runs on any batch as the user's did.
A reshape reads the sizes it keeps from its input (`x.size(1)`), as
`b, n, c = x.shape` does, so token passes can change the token count; other
sizes are plain numbers. Attention masks that mask nothing are dropped. Ops
without a torch.fx spelling stay ATen calls: they run, pickle and export all
the same.
"""

from __future__ import annotations

import operator
import warnings
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten

# ATen ops and what torch.fx records for them: a function or a method taking the same arguments,
# nothing (an identity, a check made at capture), or a function whose arguments are rewritten.
_FUNCTIONS = {
    aten.add.Tensor: operator.add, aten.add_.Tensor: operator.add, aten.mul.Tensor: operator.mul,
    aten.sub.Tensor: operator.sub, aten.div.Tensor: operator.truediv, aten.matmul.default: operator.matmul,
    aten.bmm.default: torch.bmm, aten.cat.default: torch.cat, aten.mean.dim: torch.mean,
    aten.gelu.default: F.gelu, aten.relu.default: torch.relu, aten.relu_.default: torch.relu,
    aten.silu.default: F.silu, aten.silu_.default: F.silu, aten.hardswish_.default: F.hardswish,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d, aten.adaptive_avg_pool1d.default: F.adaptive_avg_pool1d,
    aten.pad.default: F.pad, aten.sum.dim_IntList: torch.sum,
    aten.sigmoid.default: torch.sigmoid, aten.tanh.default: torch.tanh,
    aten.scaled_dot_product_attention.default: F.scaled_dot_product_attention,
}
_METHODS = {
    aten.view.default: "reshape", aten.reshape.default: "reshape", aten._unsafe_view.default: "reshape",
    aten.permute.default: "permute", aten.transpose.int: "transpose", aten.expand.default: "expand",
    aten.flatten.using_ints: "flatten", aten.unflatten.int: "unflatten", aten.sym_size.int: "size",
    aten.unsqueeze.default: "unsqueeze", aten.squeeze.dim: "squeeze", aten.contiguous.default: "contiguous",
    aten.chunk.default: "chunk", aten.unbind.int: "unbind", aten.to.dtype: "to",
    aten.split_with_sizes.default: "split",
}
_IDENTITY = (aten.dropout.default, aten.alias.default, aten.clone.default, aten.detach.default)
_CHECKS = (aten._assert_tensor_metadata.default,)  # export's own checks on dtypes, made at capture
_MAX = 2**63 - 1


def _softmax(args, kwargs):
    return (args[0], args[1]), {}


def _index(dim: int, index) -> tuple:
    return (slice(None),) * dim + (index,)


def _select(args, kwargs):
    x, dim, index = args
    return (x, _index(dim, index)), {}


def _slice(args, kwargs):
    x, dim, start, end, step = (*args, *(None, None, None, 1)[len(args) - 1:])[:5]
    end = None if end is not None and not isinstance(end, fx.Node) and end >= _MAX else end
    return (x, _index(dim, slice(start, end, None if step == 1 else step))), {}


def _upsample(mode: str):
    """aten.upsample_<mode>.vec(x, output_size, [align_corners,] scale_factors) as F.interpolate."""
    def convert(args, kwargs):
        x, size, *corners, scales = args
        return (x,), {"size": size, "scale_factor": scales, "mode": mode,
                      **({"align_corners": corners[0]} if corners else {})}
    return convert


_REWRITTEN = {
    aten.softmax.int: (torch.softmax, _softmax), aten._softmax.default: (torch.softmax, _softmax),
    aten.select.int: (operator.getitem, _select), aten.slice.Tensor: (operator.getitem, _slice),
    **{getattr(aten, f"upsample_{mode}2d").vec: (F.interpolate, _upsample(mode))
       for mode in ("nearest", "bilinear", "bicubic")},
}


class _Rewriter:
    """Copies an exported graph node by node into torch.fx's vocabulary (see the module docstring)."""

    def __init__(self, exported: fx.GraphModule):
        self.source = exported
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}

    def arg(self, a):
        return fx.map_arg(a, lambda n: self.value(n))

    def value(self, node: fx.Node) -> fx.Node:
        """The copy of `node`; a parameter is copied on first use, under its own name."""
        if node not in self.env and node.op == "get_attr":
            self.env[node] = self.graph.get_attr(self.attribute(node.target))
        return self.env[node]

    def attribute(self, target: str) -> str:
        tensor = _fetch(self.source, target)
        owner, _, leaf = target.rpartition(".")
        module = _module_at(self.root, owner)
        if not hasattr(module, leaf):
            if isinstance(tensor, nn.Parameter):
                module.register_parameter(leaf, tensor)
            else:
                module.register_buffer(leaf, tensor)
        return target

    def module(self, name: str, module: nn.Module, x: fx.Node) -> fx.Node:
        owner, _, leaf = name.rpartition(".")
        _module_at(self.root, owner).add_module(leaf, module)
        return self.graph.call_module(name, (self.arg(x),))

    def copy(self, node: fx.Node) -> fx.Node | None:
        if node.op == "placeholder":
            return self.graph.placeholder(node.name)
        if node.op == "call_module":  # torch.export's guard on the input's shape: checked at capture
            return None
        if node.op == "get_attr":  # copied where first used, so unused weights are left behind
            return None
        if node.op == "output":
            flat = node.args[0]
            return self.graph.output(self.arg(flat[0] if isinstance(flat, (tuple, list)) and len(flat) == 1
                                              else flat))
        if node.op != "call_function":
            return self.graph.node_copy(node, self.value)
        return self.call(node)

    def call(self, node: fx.Node) -> fx.Node:
        target, args, kwargs = node.target, node.args, node.kwargs
        layer = _layer(self.source, node)
        if layer is not None:
            return self.module(*layer, args[0])
        if target in _IDENTITY:
            return self.value(args[0])
        if target in _CHECKS:
            return None
        if target in _FUNCTIONS:
            return self.graph.call_function(_FUNCTIONS[target], self.arg(args), self.arg(kwargs))
        if _METHODS.get(target) == "reshape":
            return self.reshape(*args)
        if target in _METHODS:
            return self.graph.call_method(_METHODS[target], self.arg(args), self.arg(kwargs))
        if target in _REWRITTEN:
            function, convert = _REWRITTEN[target]
            args, kwargs = convert(args, kwargs)
            return self.graph.call_function(function, self.arg(args), self.arg(kwargs))
        return self.graph.node_copy(node, self.value)

    def reshape(self, x: fx.Node, sizes: list) -> fx.Node:
        """`x.reshape(*sizes)`, a size export fixed that keeps an axis of `x` read from `x` instead
        (`x.reshape(x.size(0), x.size(1), 4, 16)`), as fx traces `b, n, c = x.shape`: the token
        count then follows a token pass, and a head count is rewritten as surgery rewrites any."""
        shape = x.meta["val"].shape
        sizes = [self.graph.call_method("size", (self.value(x), i))
                 if i < len(shape) and type(s) is int and s > 1 and shape[i] == s else self.arg(s)
                 for i, s in enumerate(sizes)]
        return self.graph.call_method("reshape", (self.value(x), *sizes))

    def run(self) -> fx.GraphModule:
        for node in self.source.graph.nodes:
            copied = self.copy(node)
            if copied is not None:
                copied.meta = {}
                self.env[node] = copied
        gm = fx.GraphModule(self.root, self.graph)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return gm


def _fetch(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, leaf = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, leaf)


def _module_at(root: nn.Module, path: str) -> nn.Module:
    """The submodule of `root` at `path`, made as empty nn.Modules where missing."""
    module = root
    for part in path.split(".") if path else ():
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    return module


def _module_name(weight: str) -> str:
    """The layer a weight belongs to: 'blocks.0.qkv.weight' -> 'blocks.0.qkv', 'mha.in_proj_weight' -> 'mha.in_proj'."""
    owner, _, leaf = weight.rpartition(".")
    return owner if leaf == "weight" else f"{owner}.{leaf.removesuffix('_weight')}".lstrip(".")


_CONV = (aten.conv2d.default, aten.conv2d.padding)  # padding as numbers, or as 'valid' or 'same'


def _layer(gm: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module] | None:
    """A Linear, Conv2d, LayerNorm, GroupNorm or BatchNorm2d with the weights `node` applies, and its name;
    None for other ops."""
    args = list(node.args)
    weights = (args[2:4] if node.target in (aten.layer_norm.default, aten.group_norm.default) else
               args[1:5] if node.target is aten.batch_norm.default else args[1:3])
    params = [a for a in weights if isinstance(a, fx.Node) and a.op == "get_attr"]
    if not params or len(params) != len([w for w in weights if w is not None]):
        return None
    weight, *bias = (_fetch(gm, p.target) for p in params)
    if node.target is aten.linear.default:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bool(bias))
    elif node.target in _CONV:
        stride, padding, dilation, groups = (*args[3:], *([1, 1], [0, 0], [1, 1], 1)[max(len(args) - 3, 0):])[:4]
        layer = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride, padding,
                          dilation, groups, bias=bool(bias))
    elif node.target is aten.layer_norm.default:
        layer = nn.LayerNorm(args[1], eps=args[4] if len(args) > 4 else 1e-5, bias=bool(bias))
    elif node.target is aten.group_norm.default and bias:
        layer = nn.GroupNorm(args[1], weight.shape[0], eps=args[4] if len(args) > 4 else 1e-5)
    elif node.target is aten.batch_norm.default and len(bias) == 3 and not args[5]:
        kind = nn.BatchNorm2d if args[0].meta["val"].dim() == 4 else nn.BatchNorm1d
        layer = kind(weight.shape[0], eps=args[7]).eval()
        layer.running_mean, layer.running_var = bias[1:]
        bias = bias[:1]
    else:
        return None
    layer.weight = weight
    if bias:
        layer.bias = bias[0]
    return _module_name(params[0].target), layer


def exported(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """`model` captured by torch.export on `example`, batch dynamic, written as torch.fx records it."""
    batch = torch.cat([example, example]) if example.shape[0] == 1 else example  # a batch of 1 would be fixed
    with warnings.catch_warnings():  # caches a model fills on its first call (timm's attention biases)
        warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
        program = torch.export.export(model, (batch,), dynamic_shapes=({0: torch.export.Dim.AUTO},), strict=False)
    gm = _Rewriter(program.module()).run()
    _drop_empty_masks(gm, batch)
    return gm


def _drop_empty_masks(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Remove attention masks that mask nothing: Hugging Face builds an all-True mask (an
    all-zero bias in eager attention) from the sequence length alone. It would fix the token
    count, which token passes change, and export as ops that compute nothing."""
    image = next(n for n in gm.graph.nodes if n.op == "placeholder")
    from_image = {image}
    for node in gm.graph.nodes:
        is_size = node.op == "call_method" and node.target == "size"
        if not is_size and any(a in from_image for a in node.all_input_nodes):
            from_image.add(node)
    uses = defaultdict(list)  # mask -> how to drop it from each attention that reads it
    for node in gm.graph.nodes:
        if node.target is F.scaled_dot_product_attention and len(node.args) > 3:
            uses[node.args[3]].append(lambda n=node: setattr(n, "args", n.args[:3]))
        elif node.target is torch.softmax and node.args[0].target is operator.add:
            add = node.args[0]
            for mask, other in (add.args, add.args[::-1]):
                uses[mask].append(lambda n=add, other=other: n.replace_all_uses_with(other))
    masks = {m for m in uses if isinstance(m, fx.Node) and m not in from_image}
    values = _values(gm, example, masks)
    for mask in masks:
        value = values[mask]
        if not isinstance(value, torch.Tensor):
            continue
        if bool(value.all()) if value.dtype == torch.bool else not bool(value.any()):
            for drop in uses[mask]:
                drop()
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _values(gm: fx.GraphModule, example: torch.Tensor, nodes: set[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """The values `nodes` take when `gm` runs on `example`."""
    values = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n in nodes:
                values[n] = result
            return result

    with torch.no_grad():
        Recorder(gm).run(example)
    return values
