"""What head_prune and ffn_prune may cut in a graph evc does not recognise, read from its pruning groups.

    heads = candidates(gm, "heads")    # evc.ir.groups.Group of kind "heads", one per attention
    units = candidates(gm, "units")    # hidden units of FFNs: widened by one projection, narrowed by another

A heads group is one the channel analysis split by a reshape into (heads,
head_dim) and carried on a matmul's batch axis, wherever that happens: heads
folded with windows into the batch, channel attention, attention pools. Units
are the other prunable groups that a projection widens and another narrows,
whatever lies between (an activation or none, depthwise convs, GLU halves): an
FFN, an inverted bottleneck. A group the analysis could not prove safe is
frozen and never a candidate; `evc explain` lists it with its reason.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import fx

from evc.ir.groups import Group, Member, channel_groups


def candidates(gm: fx.GraphModule, kind: str, groups: list[Group] | None = None) -> list[Group]:
    """The groups head_prune ("heads") or ffn_prune ("units") may cut, in graph order."""
    groups = channel_groups(gm) if groups is None else groups
    if kind == "heads":
        return [g for g in groups if g.kind == "heads" and g.heads > 1]
    return [g for g in groups if g.kind == "units" and _widened_then_narrowed(gm, g)]


def tensor_of(gm: fx.GraphModule, name: str) -> torch.Tensor:
    """The parameter or buffer a Member names."""
    owner, _, leaf = name.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, leaf)


def is_weight(gm: fx.GraphModule, member: Member) -> bool:
    """A projection's weight along its output (dim 0) or input (dim 1) channels: not a bias, norm or
    depthwise kernel, whose second axis counts one channel."""
    tensor = tensor_of(gm, member.name)
    return member.dim in (0, 1) and tensor.dim() >= 2 and tensor.shape[1] > 1


def _widened_then_narrowed(gm: fx.GraphModule, group: Group) -> bool:
    weights = [(m, tensor_of(gm, m.name).shape) for m in group.members if is_weight(gm, m)]
    widened = any(m.dim == 0 and shape[0] > shape[1] for m, shape in weights)
    narrowed = any(m.dim == 1 and shape[1] > shape[0] for m, shape in weights)
    return widened and narrowed


def describe(group: Group) -> str:
    """A group in words, naming its first projection: "blocks.3.attn.qkv: 6 heads of 64"."""
    first = group.members[0].name.rpartition(".")[0] or group.members[0].name
    if group.kind == "heads":
        return f"{first}: {group.heads} heads of {group.head_dim}"
    return f"{first}: {group.width} {group.kind}"


def channel_norms(gm: fx.GraphModule, group: Group, p: int) -> np.ndarray:
    """Per channel of `group`: the p-norm of everything it removes from every member (q/k/v rows and
    projection columns of a head; fc1 rows, fc2 columns and per-unit extras of a hidden unit)."""
    total = np.zeros(group.width)
    for member in group.members:
        tensor = tensor_of(gm, member.name).detach().float()
        per = tensor.abs().pow(p).movedim(member.dim, 0).reshape(member.width, -1).sum(dim=1).numpy()
        channel = group.channels[member]
        np.add.at(total, channel[channel >= 0], per[channel >= 0])
    return total ** (1 / p)
