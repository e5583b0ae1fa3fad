"""Pruning groups: the channels that must be removed together, found from how channels flow through the graph.

    for group in channel_groups(gm):          # gm from evc.ir.trace.trace
        group.kind        # "heads", "head_dim", "units", "stream" or "frozen"
        group.width       # its channels: 3 heads, 768 hidden units, 192 stream channels
        group.members     # Member(name, dim, width): the parameter and buffer axes sliced with it
        group.kept(member, keep=[0, 2])        # the indices of member's axis that stay
        group.constants   # Constant(node, arg, ...): reshape sizes that count its channels
        group.reason      # why a frozen group cannot be pruned, naming the node at fault

DepGraph's idea (Fang et al., CVPR 2023; Torch-Pruning): every node joins the
index spaces of its inputs' and outputs' axes by a small rule (a Linear joins
its input's last axis with its weight's columns, an add joins both operands,
a reshape to (heads, head_dim) splits an axis into two), `evc.ir.channels`
keeps the joins, and each class no split divides is one group. Its kind comes
from what touched it: heads are split off by a reshape and ride a matmul's
batch axis; the stream is normalised or joined by residual adds; units are the
rest that can be pruned; anything reaching the output, or an op with no rule,
freezes it. A group is closed: removing its channels from every member, and
rewriting its constants, leaves the rest of the model computing the same.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn
from torch.fx.experimental import meta_tracer

from evc.ir import attention_rules, group_rules
from evc.ir.channels import Spaces
from evc.ir.group_rules import module_rule, size_args
from evc.ir.trace import _ShapeProp
from evc.ir.view import node_shape, size_value


@dataclass(frozen=True)
class Member:
    name: str  # parameter or buffer name, as gm.get_parameter takes it
    dim: int
    width: int  # the axis's size, which may hold other groups' channels too (qkv rows hold q, k and v)


@dataclass(frozen=True)
class Constant:
    """A size a graph node is given (a reshape's, a split's) or a module holds (a depthwise conv's groups)
    that counts the group's channels; or, with per_channel 0, one read at run time from the group's
    channels that sizes another axis (Twins reads its window size from its heads axis): pinned to its value."""

    node: str  # node name, or module name where `arg` is an attribute
    arg: int | str  # index into the node's sizes (a reshape's shape, a split's list), or a module attribute
    per_channel: int  # the size is per_channel * kept + rest
    rest: int

    def value(self, kept: int) -> int:
        return self.per_channel * kept + self.rest


@dataclass(frozen=True)
class Group:
    kind: str  # "heads", "head_dim", "units", "stream" or "frozen"
    width: int
    members: tuple[Member, ...]
    constants: tuple[Constant, ...] = ()
    reason: str | None = None  # what froze it, or what made it the stream
    heads: int | None = None  # heads and head_dim of a "heads" group
    head_dim: int | None = None
    channels: dict = field(default_factory=dict, repr=False, compare=False)  # Member: channel of each index

    def kept(self, member: Member, keep) -> np.ndarray:
        """Indices of `member`'s axis that stay when the group keeps channels `keep`."""
        channel = self.channels[member]
        return np.flatnonzero((channel < 0) | np.isin(channel, np.asarray(keep, dtype=int)))

    def member(self, name: str, dim: int) -> Member:
        return next(m for m in self.members if (m.name, m.dim) == (name, dim))


RULES = {**group_rules.RULES, **attention_rules.RULES}


def channel_groups(gm: fx.GraphModule) -> list[Group]:
    """The pruning groups of `gm`, a traced model whose nodes carry their shapes, in order of first member."""
    flow = _Flow(gm)
    for node in gm.graph.nodes:
        flow.read(node)
    return flow.groups()


class _Flow:
    """The index spaces of every node's axes, filled in graph order."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.spaces = Spaces()
        self.axes: dict[fx.Node, list | tuple | None] = {}
        self.params: dict[tuple[str, int], int] = {}  # (name, dim) -> space
        self.sizes: list[tuple[str, int | str, int]] = []  # (node, arg, space) of Constants
        self.pins: list[tuple[str, int, int, int, int]] = []  # (node, arg, space read, space sized, value)
        self.live: set[fx.Node] = set()  # nodes computed from the input

    # -- what rules call
    def fresh(self, shape) -> list[int]:
        return [self.spaces.new(n) for n in shape]

    def param(self, name: str, dim: int, size: int) -> int:
        if (name, dim) not in self.params:
            self.params[name, dim] = self.spaces.new(size)
        return self.params[name, dim]

    def module_params(self, module: nn.Module, prefix: str, dims: dict[str, int], space: int) -> None:
        """Join axis 0 of `module`'s own tensors named in `dims` (weight, bias, running stats) to `space`."""
        tensors = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
        for leaf, dim in dims.items():
            if tensors.get(leaf) is not None and tensors[leaf].dim() > dim:
                self.union(self.param(f"{prefix}.{leaf}", dim, tensors[leaf].shape[dim]), space)

    def union(self, a: int, b: int) -> None:
        if self.spaces.size[a] > 1 or self.spaces.size[b] > 1:
            self.spaces.union(a, b)

    def mark(self, space: int, key: str, value: str) -> None:
        if self.spaces.size[space] > 1:
            self.spaces.mark(space, key, value)

    def freeze(self, node_or_axes, reason: str) -> None:
        axes = self.axes.get(node_or_axes) if isinstance(node_or_axes, fx.Node) else node_or_axes
        for s in _flat(axes):
            self.mark(s, "frozen", reason)

    # -- the walk
    def read(self, node: fx.Node) -> None:
        self.spaces.where = node.name
        if node.op == "output":
            for arg in node.all_input_nodes:
                self.freeze(arg, f"it reaches the model's output at node '{arg.name}'")
            return
        if node.op == "placeholder" or any(a in self.live for a in node.all_input_nodes):
            self.live.add(node)
        shapes = _shapes(node)
        if shapes is None:
            self.axes[node] = None
            return
        rule = self._rule(node)
        try:
            axes = rule(self, node) if rule else None
        except Exception:  # a rule that cannot read the node leaves it to the rule for unknown ops
            axes = None
        if axes is None or not self._fits(axes, shapes):
            axes = self._unknown(node, shapes)
        self.axes[node] = axes

    def _rule(self, node: fx.Node):
        if node.op == "placeholder":
            return _input
        if node.op == "get_attr":
            return _attribute
        if node.op == "call_module":
            return module_rule(self.gm.get_submodule(node.target))
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
        if name.split(".")[0] not in RULES and inspect.isfunction(node.target):
            return _inlined
        return RULES.get(name.split(".")[0])

    def _fits(self, axes, shapes) -> bool:
        if shapes is None:
            return axes is None
        if _many(shapes):
            return isinstance(axes, tuple) and len(axes) == len(shapes) and all(map(self._fits, axes, shapes))
        return isinstance(axes, list) and [self.spaces.size[s] for s in axes] == list(shapes)

    def _unknown(self, node: fx.Node, shapes):
        what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
        if node.op == "call_module":
            what = type(self.gm.get_submodule(node.target)).__name__
        reason = f"node '{node.name}' ({what}) has no rule for its channels"
        for arg in node.all_input_nodes:
            self.freeze(arg, reason)
        # Its output too: nothing says how to make it narrower (torch.arange's length is a literal).
        if _many(shapes):
            out = tuple(None if s is None else self.fresh(s) for s in shapes)
        else:
            out = self.fresh(shapes)
        self.freeze(out, reason)
        return out

    # -- the groups
    def groups(self) -> list[Group]:
        spaces, above = self.spaces, self.spaces.above()
        found: dict[int, dict[Member, np.ndarray]] = {}
        for (name, dim), space in self.params.items():
            member = Member(name, dim, spaces.size[space])
            for leaf, channel in spaces.coords(space).items():
                if spaces.size[leaf] > 1:
                    found.setdefault(leaf, {})[member] = channel
        constants: dict[int, list[Constant]] = {}
        for node, arg, space in self.sizes:
            for leaf, channel in spaces.coords(space).items():
                per = int((channel == 0).sum())
                constants.setdefault(leaf, []).append(Constant(node, arg, per, int((channel < 0).sum())))
        for node, arg, read, sized, value in self.pins:  # a size read from other channels: fixed when they go
            for leaf in set(spaces.coords(read)) - set(spaces.coords(sized)):
                constants.setdefault(leaf, []).append(Constant(node, arg, 0, value))
        return [self._group(leaf, members, constants.get(leaf, ()), above) for leaf, members in found.items()]

    def _group(self, leaf: int, members: dict, constants, above) -> Group:
        spaces, lineage = self.spaces, self.spaces.ancestors(leaf, above)
        marks = {}
        for c in lineage:  # the leaf's own marks first, then those of the classes split into it
            for key, value in spaces.marks.get(c, {}).items():
                marks.setdefault(key, value)
        common = dict(width=spaces.size[leaf], members=tuple(members), constants=tuple(constants),
                      channels=members)
        if "frozen" in marks:
            return Group("frozen", reason=marks["frozen"], **common)
        if "norm" in marks:
            return Group("stream", reason=marks["norm"], **common)
        # Heads before residuals: two terms of one head added (SAM's relative positions) stay that head's.
        head_dim = self._head_dim(leaf, above)
        if head_dim and "batch" in marks:  # a batch of (windows, heads) runs each head on its own too
            return Group("heads", heads=spaces.size[leaf], head_dim=head_dim, **common)
        if "residual" in marks:
            return Group("stream", reason=marks["residual"], **common)
        if spaces.marked(leaf, "contracted") and self._split_last(leaf, above):
            return Group("head_dim", **common)
        return Group("units", **common)

    def _head_dim(self, leaf: int, above) -> int | None:
        """The size of what follows `leaf` in a product whose last factor a matmul contracts: its head_dim.
        The last factor may be q, k and v side by side (TinyViT's (heads, q k v) layout): its contracted
        part is the head_dim."""
        spaces = self.spaces
        for parent in above.get(spaces.find(leaf), ()):
            kind, parts = spaces.parts(parent)
            if kind != "product" or leaf not in parts[:-1]:
                continue
            last, inner = parts[-1], spaces.parts(parts[-1])
            if not spaces.marked(last, "contracted") and inner and inner[0] == "concat":
                last = next((p for p in inner[1] if spaces.marked(p, "contracted")), last)
            if spaces.marked(last, "contracted"):
                return math.prod(spaces.size[p] for p in parts[parts.index(leaf) + 1:-1]) * spaces.size[last]
        return None

    def _split_last(self, leaf: int, above) -> bool:
        return any(self.spaces.parts(p)[0] == "product" and self.spaces.parts(p)[1][-1] == leaf
                   for p in above.get(self.spaces.find(leaf), ()))


def _inlined(flow: _Flow, node: fx.Node):
    """A Python function tracing kept whole (timm's window_reverse), traced on its own with its sizes fixed
    and read node by node. A literal size inside it counts what it reshapes, and nothing outside can
    rewrite it: those channels freeze."""
    names = list(inspect.signature(node.target).parameters)
    given = {**dict(zip(names, node.args)), **node.kwargs}
    tensors = [name for name, a in given.items() if isinstance(a, fx.Node) and node_shape(a) is not None]
    fixed = {name: fx.node.map_arg(a, size_value) for name, a in given.items() if name not in tensors}
    sub = _traced(node.target, fixed, {t: given[t] for t in tensors})
    for n in reversed(sub.graph.nodes):  # the checks on fixed arguments, and their placeholders
        if n.target is torch._assert or (n.op in ("placeholder", "call_function") and not n.users and
                                         n.target not in tensors and n.op != "output"):
            sub.graph.erase_node(n)
    sub.recompile()
    with torch.no_grad():
        _ShapeProp(sub).propagate(*(torch.zeros(node_shape(given[t])) for t in tensors))
    before, pinned = len(flow.sizes), len(flow.pins)
    for n in sub.graph.nodes:
        n.name = f"{node.name}.{n.name}"
        if n.op == "placeholder":
            flow.axes[n] = flow.axes[given[n.target]]
            flow.live.update([n] if given[n.target] in flow.live else [])
        elif n.op == "output":
            out = n.args[0]
        elif n.op == "get_attr":  # the function's own constant (positions it computed from sizes alone)
            flow.axes[n] = flow.fresh(node_shape(n))
            flow.freeze(flow.axes[n], f"it is a constant inside node '{node.name}'")
        else:
            flow.read(n)
    for name, arg, space in flow.sizes[before:]:
        inner = next(n for n in sub.graph.nodes if n.name == name)
        if isinstance(arg, int) and isinstance(size_args(inner)[arg], int):
            flow.freeze([space], f"node '{name}' inside node '{node.name}' reshapes by a literal size")
    del flow.sizes[before:], flow.pins[pinned:]
    flow.spaces.where = node.name
    if isinstance(out, (tuple, list)) and _many(_shapes(node)):  # (x, cls_token), (x, None)
        return tuple(flow.axes.get(o) if isinstance(o, fx.Node) else None for o in out)
    return flow.axes[out[0] if isinstance(out, (tuple, list)) else out]


def _traced(function, fixed: dict, tensors: dict) -> fx.GraphModule:
    """`function` traced with its sizes fixed; where it branches on a tensor's shape (SAM's get_rel_pos
    interpolates a table of another length), traced on meta tensors of its inputs' shapes, which
    resolves the branch and computes what comes from sizes alone as constants."""
    try:
        return fx.symbolic_trace(function, concrete_args=fixed)
    except Exception:  # torch.fx raises many types; all mean "not symbolically traceable"
        meta = {name: torch.empty(node_shape(t), device="meta") for name, t in tensors.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it warns of each size it cannot give a meta tensor
            return meta_tracer.symbolic_trace(function, meta_args=meta, concrete_args=fixed)


def _input(flow: _Flow, node: fx.Node) -> list[int]:
    axes = flow.fresh(node_shape(node))
    flow.freeze(axes, f"it is the model's input '{node.name}'")
    return axes


def _attribute(flow: _Flow, node: fx.Node) -> list[int]:
    return [flow.param(node.target, dim, n) for dim, n in enumerate(node_shape(node))]


def _shapes(node: fx.Node):
    """The node's shape, a tuple of shapes for a tuple of tensors, or None where it is no tensor."""
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return None
    if hasattr(meta, "shape"):
        return tuple(meta.shape)
    if isinstance(meta, (tuple, list)) and meta and any(hasattr(m, "shape") for m in meta):
        return tuple(tuple(m.shape) if hasattr(m, "shape") else None for m in meta)
    return None


def _many(shapes) -> bool:
    """Whether `shapes` is a tuple of tensors' shapes (None where a member is no tensor), not one shape."""
    return isinstance(shapes, tuple) and bool(shapes) and all(s is None or isinstance(s, tuple) for s in shapes)


def _flat(axes):
    if axes is None:
        return []
    if isinstance(axes, tuple):
        return [s for a in axes for s in _flat(a)]
    return list(axes)
