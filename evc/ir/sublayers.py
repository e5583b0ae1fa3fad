"""Recognise one residual branch `x + f(x)` as attention or as an MLP.

    sub = sublayer(view, residual, index)   # an Attention or an Mlp, or RecognitionError

Attention is a branch with one softmax or scaled_dot_product_attention. Its
Linears before the weights meet v are q/k/v, except square Linears over the
head axis, which mix heads (CaiT's talking heads); the one Linear after is the
output projection. Constant tensors added to its logits with a head axis (a
relative position bias, folded by `evc.ir.constants`) belong to its heads.

An MLP is Linear, activation, Linear, or a gated one (SwiGLU, GEGLU): two
input projections multiplied, or one whose output is chunked in two.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from evc.ir.structure import Attention, Local, Mlp
from evc.ir.view import (
    CATS,
    RecognitionError,
    Residual,
    View,
    between,
    is_add,
    is_dense,
    is_score,
    is_sdpa,
    last_linear,
    node_shape,
    size_value,
    widths,
)

_RESHAPE_METHODS = ("reshape", "view", "unflatten")
_MATMULS = (operator.matmul, torch.matmul, torch.bmm, torch.einsum, "matmul", "bmm")
_ACT_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Hardswish, nn.Mish, nn.Tanh, nn.Sigmoid)
_ACT_FUNCTIONS = (F.gelu, F.relu, F.silu, F.hardswish, F.mish, torch.relu, torch.sigmoid, torch.tanh)
_ACT_METHODS = ("relu", "sigmoid", "tanh")
_MULS = (operator.mul, torch.mul)


def sublayer(view: View, residual: Residual, index: int, axis: int = -1) -> Attention | Mlp | Local:
    """The branch of `residual` as attention or an MLP; on (B, C, H, W) maps (`axis` 1), a branch that
    is neither mixes tokens by convolution or pooling (`Local`)."""
    scores = [n for n in residual.branch if is_score(n)]
    linears = [n for n in residual.branch if is_dense(view, n)]
    end = last_linear(view, residual).name
    where = f"block {index}: the branch ending at node '{end}'"
    if len(scores) > 1 or (scores and len(node_shape(scores[0]) or ()) == 3):  # a head per softmax
        cascade = _cascade(view, residual, scores, index)
        if cascade is not None:
            return cascade
        if len(scores) > 1:
            message = f"{where} has {len(scores)} softmax/attention nodes, expected one (or one per head, cascaded)"
            raise RecognitionError(scores[1].name, message)
    if scores:
        return _attention(view, residual, scores[0], index)
    has_heads = axis == -1 and any(len(node_shape(n) or ()) >= 4 for n in residual.branch)
    has_activation = any(_is_activation(view, n) for n in residual.branch)
    # On maps, a dense conv between the 1 x 1 convs (a ResNet bottleneck) makes the branch a conv mixer;
    # in a token MLP, ffn_prune names it when asked to remove units under it.
    is_mlp = len(linears) in (2, 3) and (has_activation or not has_heads)
    if is_mlp and (axis == -1 or _per_unit_between(view, linears)):
        return _mlp(view, residual, linears, index)
    if axis == 1:
        return Local(residual.add.name)
    if len(linears) > 3 or has_heads:
        where = where.replace("the branch", "the attention branch")
        raise RecognitionError(end, f"{where} has no softmax or scaled_dot_product_attention")
    message = (
        f"{where} has {len(linears)} Linear(s) and no softmax; expected attention "
        "(softmax or scaled_dot_product_attention) or an MLP (Linear, activation, Linear)"
    )
    raise RecognitionError(end, message)


def _per_unit_between(view: View, linears: list[fx.Node]) -> bool:
    """Whether every convolution between the first input projection and the output one treats each
    hidden unit on its own (a depthwise conv, PVT-v2's and EfficientFormerV2's): a dense 3 x 3 conv
    there (a ResNet bottleneck) makes the branch no MLP."""
    convs = [n for n in between(view, linears[0], linears[-1])[:-1] if view.is_a(n, nn.Conv2d)]
    return all(view.module(n).groups == view.module(n).in_channels == view.module(n).out_channels for n in convs)


# ---- attention --------------------------------------------------------------------------------

def _ints(value) -> list[int]:
    if isinstance(value, (tuple, list)):
        return [i for v in value for i in _ints(v)]
    return [] if size_value(value) is None else [size_value(value)]


def _carries_head_count(node: fx.Node, heads: int, head_dim: int) -> bool:
    """A reshape that sets the head count: by number (a literal, or a width read from a shape),
    or as the -1 it infers (Hugging Face's `view(b, n, -1, head_dim)`, which needs no rewrite)."""
    reshape = (node.op == "call_method" and node.target in _RESHAPE_METHODS) or node.target is torch.reshape
    if not reshape:
        return False
    if any(i in (heads, heads * head_dim) for i in _ints([*node.args[1:], *node.kwargs.values()])):
        return True
    sizes, shape = node.args[1:], node_shape(node)
    sizes = [size_value(a) for a in (sizes[0] if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else sizes)]
    if -1 not in sizes or shape is None or len(sizes) != len(shape):
        return False
    axis = sizes.index(-1)
    return shape[axis:axis + 2] == (heads, head_dim) or (axis == len(shape) - 1 and shape[-1] == heads * head_dim)


def _mixing(view: View, residual: Residual, score: fx.Node) -> fx.Node | None:
    """Where the attention weights meet v: sdpa itself, or the first matmul after the softmax."""
    if is_sdpa(score):
        return score
    after = view.reached(score, residual.add)
    return next((n for n in view.after(score, residual.add) if n in after and n.target in _MATMULS), None)


def _mixes_heads(view: View, node: fx.Node, heads: int) -> bool:
    """A Linear over the head axis, heads in and heads out (CaiT's talking heads), or a 1 x 1 Conv2d
    over it, (B, heads, N, N) (EfficientFormerV2's)."""
    shape = node_shape(node.args[0]) or ()
    axis = 1 if view.is_a(node, nn.Conv2d) else -1
    return widths(view.module(node)) == (heads, heads) and len(shape) == 4 and shape[axis] == heads


def _logit_biases(view: View, score: fx.Node, upstream: tuple[fx.Node, ...], heads: int) -> tuple[str, ...]:
    """Constant weights added to the logits with one value per head: sdpa's float mask, or an
    operand of an add before the softmax."""
    if is_sdpa(score):
        mask = score.kwargs.get("attn_mask", score.args[3] if len(score.args) > 3 else None)
        candidates = [mask] if isinstance(mask, fx.Node) else []
    else:
        candidates = [a for n in upstream if is_add(n) and view.order[n] < view.order[score]
                      for a in n.all_input_nodes]
    # (heads, N, N) or (1, heads, N, N); Swin's shift mask, (1, windows, 1, N, N), is not per head.
    per_head = [a for a in candidates if a.op == "get_attr" and node_shape(a) is not None
                and (node_shape(a)[:-3] in ((), (1,))) and len(node_shape(a)) >= 3 and node_shape(a)[-3] == heads]
    return tuple(a.target for a in per_head)


def _attention(view: View, residual: Residual, score: fx.Node, index: int) -> Attention:
    where = f"block {index}: the attention branch ending at node '{last_linear(view, residual).name}'"
    mix = _mixing(view, residual, score)
    if mix is None:
        message = f"{where} never multiplies the weights of node '{score.name}' with v"
        raise RecognitionError(score.name, message)
    s = node_shape(score)
    if s is None or len(s) < 4:
        message = f"{where}: node '{score.name}' has shape {s}, with no head axis (B, heads, N, ...)"
        raise RecognitionError(score.name, message)
    heads = s[-3]
    linears = [n for n in residual.branch if is_dense(view, n)]
    upstream = between(view, residual.skip, mix)
    downstream = view.reached(mix, residual.add)
    mixers = [n for n in linears if n in upstream and _mixes_heads(view, n, heads)]
    qkv = [n for n in linears if n in upstream and n not in mixers]
    proj = [n for n in linears if n in downstream]
    if not qkv:
        raise RecognitionError(score.name, f"{where} has no q/k/v Linear before node '{score.name}'")
    if len(proj) != 1:
        message = f"{where} has {len(proj)} Linears after node '{mix.name}', expected one output projection"
        raise RecognitionError(mix.name, message)
    head_dim = widths(view.module(proj[0]))[0] // heads
    # A reshape of the block's input itself (PVT's spatial reduction) has the width, not the heads.
    from_qkv = set().union(*(view.reached(n, mix) for n in qkv))
    splits = [n for n in upstream if n in from_qkv] + list(between(view, mix, proj[0]))
    head_count = tuple(n.name for n in splits if _carries_head_count(n, heads, head_dim))
    if not head_count:
        raise RecognitionError(score.name, f"{where} has no reshape or view by the head count {heads}")
    return Attention(tuple(n.target for n in qkv), proj[0].target, heads, head_dim, head_count, score.name,
                     mix.name, residual.add.name, mixers=tuple(n.target for n in mixers),
                     biases=_logit_biases(view, score, upstream, heads))


def _cascade(view: View, residual: Residual, scores: list[fx.Node], index: int) -> Attention | None:
    """Cascaded group attention (EfficientViT-M), or None: a softmax per head, each head with its own
    q/k/v projection reading its slice of the input plus the previous head's output, the heads'
    outputs concatenated for the output projection."""
    cats = [n for n in residual.branch if n.op == "call_function" and n.target in CATS
            and isinstance(n.args[0], (list, tuple)) and len(n.args[0]) == len(scores)]
    if len(cats) != 1:
        return None
    cat, outs = cats[0], list(cats[0].args[0])
    if not all(out in view.reached(score, cat) for score, out in zip(scores, outs)):
        return None
    dense = [{n for n in between(view, residual.skip, out) if is_dense(view, n)} for out in outs]
    qkv = [own - previous for own, previous in zip(dense, [set(), *dense])]
    proj = [n for n in view.reached(cat, residual.add) if is_dense(view, n)]
    if any(len(q) != 1 for q in qkv) or len(proj) != 1:
        return None
    head_dim = widths(view.module(proj[0]))[0] // len(scores)
    if any((node_shape(out) or (0, 0))[1] != head_dim for out in outs):
        return None
    mix = _mixing(view, residual, scores[0])
    return Attention(tuple(q.pop().target for q in qkv), proj[0].target, len(scores), head_dim, (), scores[0].name,
                     mix.name, residual.add.name, heads_out=tuple(out.name for out in outs))


# ---- MLP ---------------------------------------------------------------------------------------

def _is_activation(view: View, node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _ACT_METHODS
    module = view.module(node)
    # timm's BatchNormAct2d is a BatchNorm, kept whole, that applies its activation too
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        module = getattr(module, "act", None)
    return _is_act_module(module) or (node.op == "call_function" and node.target in _ACT_FUNCTIONS)


def _is_act_module(module: nn.Module | None) -> bool:
    """torch's activations, and timm's own classes of the same (`timm.layers.activations.GELU`)."""
    return isinstance(module, _ACT_MODULES) or type(module).__module__ == "timm.layers.activations"


def _chunks(view: View, fc1: fx.Node, fc2: fx.Node) -> int:
    """In how many pieces fc1's output is cut along its features before fc2 (2 for a packed GLU)."""
    for node in between(view, fc1, fc2):
        is_chunk = (node.op == "call_method" and node.target == "chunk") or node.target is torch.chunk
        if is_chunk and node.args[0] is fc1:
            dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
            if dim in (-1, len(node_shape(fc1)) - 1):
                return node.kwargs.get("chunks", node.args[1])
    return 1


def _mlp(view: View, residual: Residual, linears: list[fx.Node], index: int) -> Mlp:
    *inputs, fc2 = linears
    where = f"block {index}: the MLP branch ending at node '{fc2.name}'"
    if len(inputs) == 2 and inputs[1] in view.reached(inputs[0]):
        raise RecognitionError(fc2.name, f"{where} has three Linears one after another; expected Linear, "
                                         "activation, Linear, or two input projections multiplied (SwiGLU)")
    acts = {i: next((n for n in between(view, i, fc2) if _is_activation(view, n)), None) for i in inputs}
    if not any(acts.values()):
        message = f"{where} has no activation after node '{inputs[0].name}'"
        raise RecognitionError(fc2.name, message)
    hidden = widths(view.module(fc2))[0]
    if len(inputs) == 1:
        fc1, gate = inputs[0], None
        packed = _chunks(view, fc1, fc2)
        act = acts[fc1]
        if widths(view.module(fc1))[1] != packed * hidden:
            raise RecognitionError(fc2.name, f"{where}: node '{fc1.name}' gives {widths(view.module(fc1))[1]} "
                                             f"features and node '{fc2.name}' reads {hidden}")
    else:
        gate = next(i for i in inputs if acts[i] is not None)
        fc1, packed = next(i for i in inputs if i is not gate), 1
        act = _product(view, fc1, gate, fc2) or acts[gate]
    if packed > 1:
        act = _product(view, fc1, fc1, fc2) or act
    return Mlp(fc1.target, fc2.target, hidden, act.name, residual.add.name,
               gate=gate.target if gate is not None else None, packed=packed,
               axis=1 if view.is_a(fc1, nn.Conv2d) else -1)


def _product(view: View, a: fx.Node, b: fx.Node, fc2: fx.Node) -> fx.Node | None:
    """The multiply where a gated MLP joins its value and its gate: what fc2 reads, unit by unit."""
    reached = view.reached(a) & view.reached(b)
    return next((n for n in between(view, a, fc2) if n in reached and n.target in _MULS), None)
