"""How attention's ops couple channels, for `evc.ir.groups`: the rules that find heads.

    rule = RULES["einsum"]      # torch.einsum("bhwc,hkc->bhwk", q, rel_pos_h)
    axes = rule(flow, node)

A matmul contracts one axis of its operands (their head_dim: "contracted")
and runs over the leading ones independently (the heads ride them: "batch");
einsum does so by its letters. A softmax or normalize makes every entry of its
axis depend on the others, so that axis cannot lose any. The rules read and
return spaces as those of `evc.ir.group_rules` do.
"""

from __future__ import annotations

from torch import fx

from evc.ir.group_rules import _arg, _name, _tensor
from evc.ir.view import node_shape


def _batch(flow, node: fx.Node, operands: list[list[int]], rank: int) -> list[int]:
    """The leading axes of a matmul's operands, broadcast: one space each, marked as a batch (heads ride it)."""
    shape = node_shape(node)[:rank]
    out = [None] * rank
    for axes in operands:
        for i, space in enumerate(reversed(axes), 1):
            if flow.spaces.size[space] == shape[-i] > 1:
                out[-i] = space if out[-i] is None else (flow.union(out[-i], space) or out[-i])
    out = [s if s is not None else flow.spaces.new(n) for s, n in zip(out, shape)]
    for s in out:
        flow.mark(s, "batch", node.name)
    return out


def _contract(flow, node: fx.Node, a: int, b: int) -> None:
    flow.union(a, b)
    flow.mark(a, "contracted", node.name)


def matmul(flow, node: fx.Node) -> list[int] | None:
    a, b = (flow.axes[x] for x in node.args[:2])
    if len(a) < 2 or len(b) < 2:
        return None
    _contract(flow, node, a[-1], b[-2])
    return _batch(flow, node, [a[:-2], b[:-2]], len(node_shape(node)) - 2) + [a[-2], b[-1]]


def einsum(flow, node: fx.Node) -> list[int] | None:
    """torch.einsum with an explicit output: the axes of one letter are one space; a letter the output
    drops is contracted, as a matmul's inner axis; one every operand and the output share is a batch."""
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or "..." in equation or "->" not in equation:
        return None
    terms, out = equation.replace(" ", "").split("->")
    terms = terms.split(",")
    letters: dict[str, list[int]] = {}
    for term, operand in zip(terms, operands, strict=True):
        for letter, space in zip(term, flow.axes[operand], strict=True):
            letters.setdefault(letter, []).append(space)
    joined = {}
    for letter, spaces in letters.items():
        widest = max(flow.spaces.size[s] for s in spaces)
        spaces = [s for s in spaces if flow.spaces.size[s] == widest]  # size 1 broadcasts
        for other in spaces[1:]:
            flow.union(spaces[0], other)
        joined[letter] = spaces[0]
        if letter not in out:
            flow.mark(spaces[0], "contracted", node.name)
        elif len(operands) > 1 and all(letter in term for term in terms):
            flow.mark(spaces[0], "batch", node.name)
    return [joined[letter] for letter in out]


def attention(flow, node: fx.Node) -> list[int]:
    """scaled_dot_product_attention: q with k on their last axis, k with v on their tokens; without a
    scale given, it divides by sqrt(head_dim), so head_dim cannot change."""
    q, k, v = (flow.axes[_arg(node, i, name)] for i, name in enumerate(("query", "key", "value")))
    _contract(flow, node, q[-1], k[-1])
    _contract(flow, node, k[-2], v[-2])
    batch = _batch(flow, node, [q[:-2], k[:-2], v[:-2]], len(q) - 2)
    mask = _arg(node, 3, "attn_mask")
    if _tensor(mask):
        logits = batch + [q[-2], k[-2]]
        for i, space in enumerate(reversed(flow.axes[mask]), 1):
            flow.union(logits[-i], space)
    if _arg(node, 6, "scale") is None:
        flow.freeze([q[-1]], f"node '{node.name}' scales by 1/sqrt(head_dim)")
    return batch + [q[-2], v[-1]]


def normalised(flow, node: fx.Node) -> list[int]:
    """softmax, normalize: every entry of the axis depends on all others; it cannot lose any."""
    axes = flow.axes[node.args[0]]
    dim = _arg(node, 2, "dim", 1) if _name(node) == "normalize" else _arg(node, 1, "dim")
    if dim is not None:
        flow.freeze([axes[dim % len(axes)]], f"node '{node.name}' normalises over it")
    return list(axes)


RULES = {
    **{name: normalised for name in ("softmax", "log_softmax", "normalize")},
    "matmul": matmul, "bmm": matmul, "einsum": einsum, "scaled_dot_product_attention": attention,
}
