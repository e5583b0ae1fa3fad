"""head_prune and ffn_prune on any transformer: cut the pruning groups found in its graph.

    program = structure_first(program, params, ctx, by_structure, by_groups)
    groups = candidates(program, "heads", ctx)       # [] with a warning where the graph has none
    groups, keep, scores = ranked(program, "heads", params, ctx)   # with each group's keep and channel scores
    program = pruned(program, [(group, kept), ...])  # checked against the same channels zeroed

A recognised ViT keeps the passes' own surgery, so it keeps the same units
under the same scores; the groups take over where recognition refused the
model, or where its surgery failed (a per-head table it did not know).
Every cut is run against the model with the removed channels zeroed first:
a difference is evc's bug, reported as an internal error naming the group,
with a reproducer the driver writes into the build folder.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from evc.errors import InputError, PassFailure
from evc.ir import prunable
from evc.ir.groups import channel_groups
from evc.passes.surgery import copy_graph
from evc.passes.surgery.groups import keep_groups, zero_groups

KINDS = {"heads": "attention heads", "units": "FFN hidden units"}


def structure_first(program, params, ctx, by_structure, by_groups):
    """`by_structure` on a recognised ViT, `by_groups` on any other model or where the structure's own
    surgery leaves a model that does not run."""
    if program.structure is None:
        return by_groups(program, params, ctx)
    try:
        return by_structure(program, params, ctx)
    except (PassFailure, InputError) as e:
        ctx.warn(f"the recognised structure's surgery failed ({e}); cutting the graph's pruning groups instead")
        return by_groups(program, params, ctx)


def candidates(program, kind: str, ctx) -> list:
    """The groups of `kind` the pass may cut. None of that kind leaves the model as it is, with a warning;
    none of any kind is a spec error at the pass's keep, naming what froze the model's groups."""
    groups = channel_groups(program.graph)
    found = prunable.candidates(program.graph, kind, groups)
    if found:
        return found
    if any(prunable.candidates(program.graph, other, groups) for other in KINDS if other != kind):
        ctx.warn(f"the graph has no {KINDS[kind]} to remove; the model is left as it is")
        return []
    frozen = sorted({g.reason for g in groups if g.kind == "frozen"})
    why = f"; frozen: {'; '.join(frozen[:3])}" if frozen else ""
    raise ctx.error("keep", f"nothing in this model can be pruned: its graph has no attention heads and no "
                            f"FFN hidden units that can be removed safely{why}")


def ranked(program, kind: str, params: dict, ctx) -> tuple[list, tuple, list[np.ndarray]]:
    """The candidate groups of `kind`, the pass's `keep` for each, and a score per channel of each."""
    groups = candidates(program, kind, ctx)
    if not groups:
        return [], (), []
    return groups, ctx.per_layer("keep", len(groups)), group_scores(program, groups, params["score"], ctx,
                                                                     params["data"])


def group_scores(program, groups: list, score: str, ctx, data: str | None) -> list[np.ndarray]:
    """A score per channel of each group: the p-norm of what it removes (l1, l2), or Taylor importance on
    `data` (per sample, |Σ w·∂L/∂w| over the weights reading the channel: the gradient of a mask on it)."""
    if score in ("l1", "l2"):
        return [prunable.channel_norms(program.graph, g, 1 if score == "l1" else 2) for g in groups]
    if score == "taylor":
        return taylor(program.graph, groups, ctx.images(data))
    raise ctx.error("score", f"score = {score} needs a recognised MLP's activation; this model's units are "
                             "found from its graph: use l1, l2 or taylor")


def taylor(gm, groups: list, images: np.ndarray) -> list[np.ndarray]:
    """Taylor importance per channel (Michel et al.): for a Linear reading channel c, Σ_i w_ic ∂L/∂w_ic is
    ∂L/∂ξ_c of a mask ξ on c, summed over tokens. L is the cross-entropy against the model's own top-1,
    or for a map output, half its squared norm."""
    gm = copy_graph(gm)
    readers = [[m for m in g.members if prunable.is_weight(gm, m) and m.dim == 1] or
               [m for m in g.members if m.dim == 0] for g in groups]
    tensors = {m.name: prunable.tensor_of(gm, m.name) for ms in readers for m in ms}
    for t in tensors.values():
        t.requires_grad_(True)
    scores = [np.zeros(g.width) for g in groups]
    for image in images:
        out = gm(torch.from_numpy(image[None]))
        loss = (F.cross_entropy(out, out.argmax(dim=-1)) if out.dim() == 2 else 0.5 * out.pow(2).sum())
        grads = dict(zip(tensors, torch.autograd.grad(loss, list(tensors.values()), allow_unused=True)))
        for group, members, total in zip(groups, readers, scores):
            sample = np.zeros(group.width)
            for m in members:
                if grads[m.name] is None:
                    continue
                product = (tensors[m.name] * grads[m.name]).detach().movedim(m.dim, 0).reshape(m.width, -1)
                channel = group.channels[m]
                np.add.at(sample, channel[channel >= 0], product.sum(dim=1).numpy()[channel >= 0])
            total += np.abs(sample)
    return [s / max(np.linalg.norm(s), 1e-12) if g.kind == "heads" else s for g, s in zip(groups, scores)]


def pruned(program, cuts: list):
    """`program` keeping, of each (group, channels) in `cuts`, those channels; checked first against the
    model with the other channels zeroed. A difference raises PassFailure naming the first group at fault."""
    cuts = [(g, list(k)) for g, k in cuts if len(k) < g.width]
    if not cuts:
        return program
    graph = _cut(program.graph, cuts)
    x = torch.randn((2, *program.example().shape[1:]), generator=torch.Generator().manual_seed(0))
    if _differs(program.graph, graph, cuts, x) is not None:
        for group, keep in cuts:  # the first group that fails alone
            alone = _cut(program.graph, [(group, keep)])
            if (diff := _differs(program.graph, alone, [(group, keep)], x)) is not None:
                raise PassFailure(
                    f"cutting pruning group {prunable.describe(group)} to {len(keep)} of {group.width} changed the "
                    f"model's outputs by {diff} against the same channels zeroed",
                    {"graph": program.graph, "group": _record(group), "keep": keep, "input": x})
        raise PassFailure("cutting the pruning groups together changed the model's outputs against the same "
                          "channels zeroed, though each alone did not", {"graph": program.graph, "input": x})
    return program.rebuilt(graph)


def _cut(gm, cuts):
    graph = copy_graph(gm)
    keep_groups(graph, cuts)
    return graph


def _differs(original, cut, cuts, x) -> str | None:
    """How far `cut` is from `original` with the cut channels zeroed, in words, or None when it is not."""
    reference = copy_graph(original)
    zero_groups(reference, cuts)
    with torch.inference_mode():
        expected = reference(x)
        try:
            got = cut(x)
        except Exception as e:  # noqa: BLE001 - any failure of the cut model is the cut's fault
            return f"failing to run ({type(e).__name__}: {e})"
    if got.shape != expected.shape:
        return f"changing their shape from {tuple(expected.shape)} to {tuple(got.shape)}"
    diff = (got - expected).abs().max().item()
    return f"max|Δ| = {diff:.3g}" if diff > 1e-4 * (1 + expected.abs().max().item()) else None


def _record(group) -> dict:
    """A group as plain data, readable without evc."""
    return {"kind": group.kind, "width": group.width, "reason": group.reason,
            "members": [(m.name, m.dim, m.width) for m in group.members],
            "channels": {f"{m.name}:{m.dim}": c.tolist() for m, c in group.channels.items()},
            "constants": [(c.node, c.arg, c.per_channel, c.rest) for c in group.constants]}
