"""Pruning groups cut for real: every member's axis sliced, every size that counts the group rewritten.

    keep_groups(gm, [(group, [0, 2]), (other, kept)])   # evc.ir.groups.Group, the channels each keeps
    zero_groups(gm, cuts)                               # the same channels zeroed instead: what it must equal

A group is closed (evc.ir.groups): removing its channels from every member and
rewriting its constants leaves the rest of the model computing what it did
with those channels zeroed. `zero_groups` makes that reference, which
evc.passes.grouped checks every cut against.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from torch import fx, nn

from evc.ir.groups import Group
from evc.ir.prunable import tensor_of

Cuts = Sequence[tuple[Group, Sequence[int]]]


def keep_groups(gm: fx.GraphModule, cuts: Cuts) -> None:
    """Keep only the given channels of each group, in place: parameters and buffers sliced, the modules
    holding them told their new widths, reshape and split sizes rewritten."""
    deltas: dict[tuple[str, int | str], int] = defaultdict(int)
    for constant, delta in _size_changes(cuts):  # sizes shared by several groups change by each one's share
        deltas[constant.node, constant.arg] += delta
    kept = _kept_along(cuts)
    for (name, dim), mask in kept.items():  # an axis several groups share is sliced once
        index = torch.as_tensor(mask.nonzero()[0], dtype=torch.long)
        _replace(gm, name, tensor_of(gm, name).detach().index_select(dim, index).clone())
    for (where, arg), delta in deltas.items():
        _resize(gm, where, arg, delta)
    for owner in {name.rpartition(".")[0] for name, _ in kept}:
        _widths_from_weights(gm.get_submodule(owner))
    gm.recompile()


def _size_changes(cuts: Cuts):
    for group, keep in cuts:
        for constant in group.constants:
            yield constant, constant.per_channel * (len(keep) - group.width)


def _kept_along(cuts: Cuts) -> dict[tuple[str, int], np.ndarray]:
    """{(tensor, axis): which of its indices stay}, every group's cut applied."""
    kept: dict[tuple[str, int], np.ndarray] = {}
    for group, keep in cuts:
        for member in group.members:
            mask = kept.setdefault((member.name, member.dim), np.ones(member.width, dtype=bool))
            channel = group.channels[member]
            mask &= (channel < 0) | np.isin(channel, np.asarray(keep, dtype=int))
    return kept


def zero_groups(gm: fx.GraphModule, cuts: Cuts) -> None:
    """Zero, in place, the channels `keep_groups` would remove."""
    with torch.no_grad():
        for (name, dim), mask in _kept_along(cuts).items():
            tensor_of(gm, name).index_fill_(dim, torch.as_tensor((~mask).nonzero()[0], dtype=torch.long), 0.0)


def _replace(gm: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=owner._parameters[leaf].requires_grad)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:  # a plain tensor attribute (a get_attr constant traced into the graph)
        setattr(owner, leaf, value)


def _resize(gm: fx.GraphModule, where: str, arg: int | str, delta: int) -> None:
    """Change the size at `arg` of node `where` (a reshape's sizes, a split's) or module attribute `arg`
    of module `where` (a depthwise conv's groups) by `delta`."""
    if isinstance(arg, str):
        module = gm.get_submodule(where)
        setattr(module, arg, getattr(module, arg) + delta)
        return
    node = next(n for n in gm.graph.nodes if n.name == where)
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    at = 2 if name == "unflatten" else 1  # unflatten(x, dim, sizes); reshape(x, sizes), split(x, sizes)
    if at == 1 and not (len(node.args) >= 2 and isinstance(node.args[1], (tuple, list))):  # x.view(B, N, C)
        sizes = list(node.args[1:])
        sizes[arg] = _value(sizes[arg]) + delta
        node.args = (node.args[0], *sizes)
        return
    args = list(node.args)
    sizes = list(args[at] if at < len(args) else node.kwargs["sizes"])
    sizes[arg] = _value(sizes[arg]) + delta
    if at < len(args):
        args[at] = type(args[at])(sizes)
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, "sizes": tuple(sizes)}


def _value(size) -> int:
    return size.meta["value"] if isinstance(size, fx.Node) else size


def _widths_from_weights(module: nn.Module) -> None:
    """The width attributes a sliced module reads in forward (a norm's shape) or prints, from its tensors."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd):  # (out, in / groups, ...), transposed (in, out / groups, ...)
        first, second = weight.shape[0], weight.shape[1] * module.groups
        module.in_channels, module.out_channels = (first, second) if module.transposed else (second, first)
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        module.normalized_shape = tuple(weight.shape)
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = weight.shape[0]
    elif isinstance(module, nn.GroupNorm):
        module.num_channels = weight.shape[0]
