"""A budget's learned candidates: gates on every searched head and hidden unit, trained under the budget (UVC).

    groups, share = learned_shares(search, run, train, joint=False, steps=300)   # or None: no gates here
    share(group, r)            # the share of the group's units kept at the threshold 1 - r

One-shot sensitivity prices each block alone, before any training, and the
other candidates are shapes drawn by hand (uniform, tapers). UVC (Yu et al.,
ICLR 2022) learns the allocation instead: a gate on each unit, trained with
the task's loss under a budget constraint. Here each head's context and each
hidden unit's activation is multiplied by a gate σ(θ) (where Taylor
importance puts its mask, evc.passes._importance), θ starting at GATE_INIT
(nearly open), and the gates are trained by the finetune's own loss (its
teacher, labels, alpha and temperature) on its training images, plus the
budget's excess as the gates would leave it:

    left    = the metric counted on the model - Σ over units of (1 - gate) × the unit's saving
              (each group's measured saving per head or unit, Search.measure)
    loss    = finetune's loss + PENALTY × max(0, left / budget - 1)

With Adam every gate moves at about the same rate, shut where the penalty
outweighs what the unit does for the loss, held open where it does not, so
the gates settle where the budget binds. Two candidates come of it: the
gates trained alone, the weights frozen (what the model as it is relies on),
and the gates trained with a copy of the weights, as UVC trains them (what
the rest of the model can make up for while the gates close). Each unit's gate is then its worth
on one scale across blocks and passes; the allocation keeps, in each block,
the units whose gate clears one threshold, the lowest threshold whose widths
a count finds within the budget. The passes still choose which units go by
their own scores: the gates choose only how many.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GATED = {"head_prune": "heads", "ffn_prune": "units"}  # the passes whose units get gates
GATE_INIT = 3.0  # σ(3) ≈ 0.95
GATE_LR = 0.05  # Adam's: a gate's logit moves about this much a step
PENALTY = 10.0  # on the budget's excess, a share of the budget
STEPS = 300  # at most
PER_JUDGED_STEP = 25  # gate steps per step of a candidate's recovery


def gate_steps(judged_steps: int) -> int:
    return min(STEPS, PER_JUDGED_STEP * judged_steps)


def learned_shares(search, run, train: list[int], joint: bool, steps: int):
    """(the gated groups, share(group, r)): the share of each group's units whose learned gate (the module's
    docstring) clears 1 - r, the gates trained `steps` steps on `run`'s images at `train`, with the model's
    weights (`joint`) or without; None where a searched pass is not one whose units take gates."""
    groups = [g for g in search.groups if g.saved > 0]
    if not groups or any(search.passes[g.pass_index].name not in GATED for g in groups):
        return None
    gates = _trained_gates(search, groups, run, train, joint, steps)

    def share(group, r):
        return float((gates[id(group)] >= 1 - r).float().mean())

    return groups, share


def _trained_gates(search, groups, run, train, joint: bool, steps: int) -> dict[int, torch.Tensor]:
    """Each group's gates σ(θ) after `steps` steps (the module's docstring), by the group's id; with `joint`, a
    copy of the model's weights trained alongside them at the finetune's learning rate."""
    from torch.utils.data import DataLoader, Subset

    from evc.passes._importance import _masked, head_sites, hidden_sites
    from evc.passes.train import _frozen, distillation_loss, logits, resolve_device

    recipe, gm = run.recipe, search.program.graph
    blocks = {b.index: b for b in search.program.structure.blocks}
    sites = [head_sites(gm, blocks[g.block]) if GATED[search.passes[g.pass_index].name] == "heads"
             else hidden_sites(blocks[g.block]) for g in groups]
    device = resolve_device(recipe.device)
    model = _masked(gm, [name for per in sites for name, _ in per]).to(device).eval()
    model.requires_grad_(joint)
    teacher = _frozen(run.teacher, device)
    generator = torch.Generator().manual_seed(recipe.seed)
    thetas = [torch.full((g.full,), GATE_INIT, device=device, requires_grad=True) for g in groups]
    optimizer = torch.optim.Adam(thetas, lr=GATE_LR)
    weights = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=recipe.lr) if joint else None
    whole = search.count(search.program)[search.metric]
    loader = DataLoader(Subset(run.images, train), batch_size=recipe.batch, shuffle=True, generator=generator)
    done = 0
    while done < steps:
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            gates = [torch.sigmoid(t) for t in thetas]
            masks = [mask for gate, per in zip(gates, sites) for mask in _masks(gate, per, len(images))]
            with torch.no_grad():
                target = logits(teacher(images)) if teacher is not None else None
            loss = distillation_loss(logits(model(images, *masks)), target, labels, recipe.alpha, recipe.temperature)
            left = whole - sum(g.saved * (g.full - gate.sum()) for g, gate in zip(groups, gates))
            loss = loss + PENALTY * F.relu(left / search.target - 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if weights is not None:
                weights.step()
                weights.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
    return {id(g): torch.sigmoid(t).detach().cpu() for g, t in zip(groups, thetas)}


def _masks(gate: torch.Tensor, sites: list, batch: int) -> list[torch.Tensor]:
    """One group's gates as the masks of its sites: every unit of one node, or one unit a node."""
    if len(sites) == 1:
        (_, shape), = sites
        full = shape(batch)
        return [gate.view(1, *shape(1)[1:]).expand(full)]
    return [g.view(1, 1, 1, 1).expand(shape(batch)) for g, (_, shape) in zip(gate, sites)]
