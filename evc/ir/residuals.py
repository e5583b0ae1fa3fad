"""The residual branches of a traced graph, found from its data flow alone: where block_skip can act.

    for branch in residual_branches(gm):      # gm from evc.ir.trace.trace
        branch.add      # the add `skip + f(x)` that closes the branch
        branch.skip     # its other operand: the stream x, or x scaled (MetaFormer's res-scale)
        branch.kind     # "attn": f mixes tokens; "mlp": f acts on each token alone
        branch.nodes    # f's own nodes: what goes when the add is replaced by its skip

An add is residual when its operands have one shape and the branch is computed
from the skip, or from the value the skip scales: MetaFormer's
`res_scale(x) + layer_scale(f(x))`, whose skip is x times a constant per
channel. The branch must hold a weight, so `x + 0.044715 * x ** 3` inside a
tanh GELU is no residual. Nothing reads a width, so stages of several widths
need nothing special; branches summed before one add (timm's parallel blocks)
are one branch.

A branch mixes tokens ("attn") when it holds attention (a softmax,
scaled_dot_product_attention, a matmul of two activations), a pooling, a
convolution wider than 1 × 1, a shift (roll) or a resampling. So MetaFormer's
token mixers (pooling, depthwise convs) are "attn", and so is an MLP with a
depthwise conv inside (PVT-v2's): removing it removes the block's spatial
mixing. A branch with none of these is "mlp". Normalisations do not count,
though GroupNorm's statistics span the tokens: they mix no token into another.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from evc.ir.group_rules import _name
from evc.ir.view import View, is_add, is_score, node_shape

_SCALES = ("mul", "mul_", "truediv", "div", "div_")
_PASSING = (nn.Identity, nn.Dropout)
_MATMULS = ("matmul", "bmm", "baddbmm", "einsum")
_MIXING = ("avg_pool1d", "avg_pool2d", "max_pool1d", "max_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
           "adaptive_max_pool2d", "interpolate", "upsample", "roll")
_CONVS = ("conv1d", "conv2d")
_MIXING_MODULES = (nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd,
                   nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.Upsample)


@dataclass(frozen=True)
class Branch:
    add: str  # node names
    skip: str
    kind: str  # "attn" or "mlp"
    nodes: tuple[str, ...]  # in graph order


def residual_branches(gm: fx.GraphModule) -> list[Branch]:
    """Every residual add of `gm` (whose nodes carry their shapes), in graph order."""
    view = View(gm)
    live = _inputs_of(view.nodes[-1])  # what the output needs: unused shape reads belong to no branch
    branches = []
    for node in view.nodes:
        skip = _skip(view, node)
        if skip is None:
            continue
        own = _own(view, node, skip, live)
        if any(_weighted(view, n) for n in own):
            kind = "attn" if any(_mixes_tokens(view, n) for n in own) else "mlp"
            branches.append(Branch(node.name, skip.name, kind, tuple(n.name for n in own)))
    return branches


def _skip(view: View, add: fx.Node) -> fx.Node | None:
    """The operand of `add` the other is computed from (directly, or from what it scales), or None."""
    if not is_add(add):
        return None
    operands = [a for a in add.args[:2] if isinstance(a, fx.Node) and a in view.from_image]
    if len(operands) != 2 or node_shape(operands[0]) is None or node_shape(operands[0]) != node_shape(operands[1]):
        return None
    first, second = sorted(operands, key=view.order.__getitem__)
    if first is not second and second in view.reached(first, second):
        return first
    for skip, branch in ((first, second), (second, first)):
        stream = _scaled(view, skip)
        while stream is not None and branch not in view.reached(stream, branch):
            stream = _scaled(view, stream)
        if stream is not None:
            return skip
    return None


def _scaled(view: View, node: fx.Node) -> fx.Node | None:
    """The one activation `node` passes on scaled by constants (a res-scale, a dropout), or None."""
    inputs = [a for a in node.all_input_nodes if a in view.from_image]
    if len(inputs) != 1 or node_shape(inputs[0]) != node_shape(node):
        return None
    scales = node.op in ("call_function", "call_method") and _name(node) in _SCALES
    return inputs[0] if scales or view.is_a(node, _PASSING) else None


def _own(view: View, add: fx.Node, skip: fx.Node, live: set[fx.Node]) -> list[fx.Node]:
    """The `live` nodes that only the branch of `add` uses: dead once the add reads its skip alone."""
    kept, dead = _inputs_of(skip), {add}
    for node in reversed(view.nodes[: view.order[add]]):
        users = [user for user in node.users if user in live]
        if node in live and node not in kept and users and all(user in dead for user in users):
            dead.add(node)
    return sorted(dead - {add}, key=view.order.__getitem__)


def _inputs_of(node: fx.Node) -> set[fx.Node]:
    """`node` and every node it is computed from."""
    found, frontier = {node}, [node]
    while frontier:
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in found]
        found.update(frontier)
    return found


def _weighted(view: View, node: fx.Node) -> bool:
    """A layer with parameters, or a tensor the model holds (a layer scale's gamma)."""
    module = view.module(node)
    return node.op == "get_attr" or (module is not None and next(module.parameters(), None) is not None)


def _mixes_tokens(view: View, node: fx.Node) -> bool:
    """Whether `node` combines values at different token positions (see the module's docstring)."""
    if view.is_a(node, _MIXING_MODULES):
        return True
    module = view.module(node)
    if isinstance(module, nn.modules.conv._ConvNd):
        return any(k > 1 for k in module.kernel_size)
    if node.op not in ("call_function", "call_method"):
        return False
    name = _name(node)
    if name in _MATMULS:
        return sum(a in view.from_image and node_shape(a) is not None for a in node.all_input_nodes) > 1
    if name in _CONVS:
        return any(k > 1 for k in (node_shape(node.args[1]) or ())[2:])
    return is_score(node) or name in _MIXING
