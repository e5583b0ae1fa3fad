"""Importance scores for structural pruning, shared by head_prune, ffn_prune and block_skip.

- Weight norms (`l1`, `l2`) need no data.
- `taylor` is the importance of "Are Sixteen Heads Really Better than One?"
  (Michel et al., 2019): a mask ξ = 1 multiplies each head's context (or each
  hidden unit's activation); |∂L/∂ξ| per sample = |Σ over tokens of
  ∂L/∂ctx · ctx|, summed over the data. With no labels at hand, L is the
  cross-entropy against the model's own top-1 prediction.
- `activation`: mean |activation| of each hidden unit over tokens and data.
- `residual`: how much a sublayer adds to the residual stream, ‖f(x)‖ / ‖x‖.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from evc.errors import InputError
from evc.ir.view import node_shape
from evc.passes.surgery import copy_graph, head_rows, hidden_rows, node_named

BATCH = 16


def _batches(images: np.ndarray):
    for start in range(0, len(images), BATCH):
        yield torch.from_numpy(images[start : start + BATCH])


def top(scores, n: int) -> list[int]:
    """Indices of the n highest scores (ties go to the lower index), in order."""
    return sorted(np.argsort(-np.asarray(scores), kind="stable")[:n].tolist())


def head_norms(gm: fx.GraphModule, attn, p: int, where: str) -> np.ndarray:
    """Per head: the p-norm of its q/k/v rows and its output-projection columns."""
    total = np.zeros(attn.num_heads)
    for linear in attn.qkv:
        weight = gm.get_submodule(linear).weight.detach().numpy()
        rows = head_rows(gm, attn, linear, where)  # -1: another head's projection (cascaded attention)
        total += np.array([np.sum(np.abs(weight[r[r >= 0]]) ** p) for r in rows])
    proj = gm.get_submodule(attn.proj).weight.detach().numpy().reshape(-1, attn.num_heads, attn.head_dim)
    total += np.sum(np.abs(proj) ** p, axis=(0, 2))
    return total ** (1 / p)


def hidden_norms(gm: fx.GraphModule, mlp, p: int) -> np.ndarray:
    """Per hidden unit: the p-norm of its fc1 row (and gate row) and fc2 column together, one shared
    score (nn_pruning)."""
    fc2 = gm.get_submodule(mlp.fc2).weight.detach().numpy()  # (out, hidden), or (out, hidden, 1, 1)
    total = np.sum(np.abs(fc2.reshape(*fc2.shape[:2])) ** p, axis=0)
    for name, rows in hidden_rows(mlp).items():
        weight = gm.get_submodule(name).weight.detach().numpy()
        per_row = np.sum(np.abs(weight.reshape(len(weight), -1)) ** p, axis=1)
        total += per_row[rows].sum(axis=0)
    return total ** (1 / p)


def _masked(gm: fx.GraphModule, names: list[str]) -> fx.GraphModule:
    """A copy of `gm` whose nodes `names` are multiplied by masks passed as extra inputs."""
    masked = copy_graph(gm)
    graph = masked.graph
    by_name = {n.name: n for n in graph.nodes}
    first = next(n for n in graph.nodes if n.op != "placeholder")
    for i, name in enumerate(names):
        with graph.inserting_before(first):
            mask = graph.placeholder(f"evc_mask_{i}")
        node = by_name[name]
        with graph.inserting_after(node):
            product = graph.call_function(operator.mul, (node, mask))
        node.replace_all_uses_with(product, delete_user_cb=lambda user: user is not product)
    masked.recompile()
    return masked


def taylor(gm: fx.GraphModule, names: list[str], mask_shapes: list, images: np.ndarray) -> list[np.ndarray]:
    """|Σ ∂L/∂x · x| per unit of each node in `names`, summed over the samples.

    `mask_shapes[i](batch)` is the shape of node i's mask for a batch: ones
    everywhere but the unit axis, e.g. (B, heads, 1, 1) for a context, or
    (B × windows, heads, 1, 1) for windowed attention, whose windows are rows.
    """
    masked = _masked(gm, names)
    scores = [0.0] * len(names)
    for x in _batches(images):
        masks = [torch.ones(shape(len(x)), requires_grad=True) for shape in mask_shapes]
        logits = masked(x, *masks)
        loss = F.cross_entropy(logits, logits.argmax(dim=-1).detach(), reduction="sum")
        grads = torch.autograd.grad(loss, masks)
        for i, grad in enumerate(grads):
            # each sample's |Σ_tokens ∂L/∂x · x| per unit; windowed attention (Swin) runs a sample's
            # windows as batch entries of their own, summed back into the sample before |.|
            per_sample = grad.reshape(len(x), grad.shape[0] // len(x), -1).sum(dim=1).abs()
            scores[i] = scores[i] + per_sample.sum(dim=0).numpy()
    return scores


def head_sites(gm: fx.GraphModule, block) -> list[tuple[str, object]]:
    """Where each head of `block`'s attention gets a mask: (node, its mask's shape for a batch) for each node, in
    head order; one node holding every head, or one per head (cascaded)."""
    if block.attn.heads_out:  # cascaded: one mask per head's output, (B x windows, head_dim, H, W)
        windows = node_shape(node_named(gm, block.attn.heads_out[0]))[0]
        return [(name, lambda b, w=windows: (b * w, 1, 1, 1)) for name in block.attn.heads_out]
    shape = node_shape(node_named(gm, block.attn.context_node))
    if shape is None or len(shape) != 4 or shape[1] != block.attn.num_heads:
        raise InputError(f"block {block.index}: node '{block.attn.context_node}' has shape {shape}, "
                         "expected (batch, heads, tokens, head_dim)")
    # the example's batch is 1: a context with more rows runs each sample's windows as rows
    return [(block.attn.context_node, lambda b, h=block.attn.num_heads, windows=shape[0]: (b * windows, h, 1, 1))]


def hidden_sites(block) -> list[tuple[str, object]]:
    """Where `block`'s MLP hidden units get a mask: [(its activation node, the mask's shape for a batch)]."""
    m = block.mlp
    return [(m.act_node, lambda b: (b, m.hidden, 1, 1) if m.axis == 1 else (b, 1, m.hidden))]


def head_taylor(gm: fx.GraphModule, blocks, images: np.ndarray) -> list[np.ndarray]:
    """Taylor importance of every head of `blocks`, normalised per layer (Michel et al.)."""
    sites = [head_sites(gm, block) for block in blocks]
    scores = iter(taylor(gm, [n for s in sites for n, _ in s], [f for s in sites for _, f in s], images))
    per_layer = [np.concatenate([next(scores) for _ in s]) for s in sites]
    return [s / max(np.linalg.norm(s), 1e-12) for s in per_layer]


def hidden_taylor(gm: fx.GraphModule, blocks, images: np.ndarray) -> list[np.ndarray]:
    sites = [site for block in blocks for site in hidden_sites(block)]
    return taylor(gm, [n for n, _ in sites], [f for _, f in sites], images)


class _Watch(fx.Interpreter):
    """Runs the graph and hands the values at some nodes to a callback."""

    def __init__(self, gm, watch: dict):
        super().__init__(gm)
        self.watch = watch

    def run_node(self, n):
        result = super().run_node(n)
        if n.name in self.watch:
            self.watch[n.name](n, result, self.env)
        return result


def activations(gm: fx.GraphModule, blocks, images: np.ndarray) -> list[np.ndarray]:
    """Mean |activation| of each hidden unit, over tokens and samples."""
    axes = {b.mlp.act_node: b.mlp.axis for b in blocks}
    sums = dict.fromkeys(axes, 0.0)
    counts = dict.fromkeys(axes, 0)

    def add(node, value, env):
        units = value.movedim(axes[node.name], -1).reshape(-1, value.shape[axes[node.name]]).abs()
        sums[node.name] = sums[node.name] + units.sum(dim=0).numpy()
        counts[node.name] += len(units)

    with torch.no_grad():
        for x in _batches(images):
            _Watch(gm, {name: add for name in sums}).run(x)
    return [sums[b.mlp.act_node] / counts[b.mlp.act_node] for b in blocks]


def residual_ratios(gm: fx.GraphModule, spans: dict[str, tuple[str, str]], images: np.ndarray) -> dict[str, float]:
    """For each name → (entering, leaving) node pair: the mean over samples of ‖leaving − entering‖ / ‖entering‖.

    A sublayer is spanned by its residual add's stream input and the add itself;
    a whole block by its first sublayer's stream input and its last add.
    """
    totals = {name: 0.0 for name in spans}
    entering: dict[str, torch.Tensor] = {}
    seen = 0

    starts = {start for start, _ in spans.values()}

    def visit(node, value, env):  # a node may end one span and start the next
        for name, (start, end) in spans.items():
            if end == node.name:
                x = entering[start].flatten(1)
                delta = (value.flatten(1) - x).norm(dim=1)
                totals[name] += (delta / x.norm(dim=1).clamp_min(1e-12)).sum().item()
        if node.name in starts:
            entering[node.name] = value

    watch = {node: visit for span in spans.values() for node in span}
    with torch.no_grad():
        for x in _batches(images):
            _Watch(gm, watch).run(x)
            seen += len(x)
    return {name: total / seen for name, total in totals.items()}
