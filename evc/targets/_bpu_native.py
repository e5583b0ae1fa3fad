"""The BPU-native lowering: rewrites of an exported ONNX graph into forms the Bayes-e operator table runs.

    model = bpu_native(onnx_model)    # value for value the same model, its nodes in the BPU's forms

Each rewrite replaces a node the operator table sends to the CPU (or a shape
it would not take) with nodes it runs, and computes the same values:

- q, k and v split from one fused projection through a 5-D reshape, transpose
  and a Split (or Gather) along axis 0 become one projection each, its weight
  the fused weight's rows: 4-D from the projection on, no Split;
- a MatMul of a 3-D or 4-D tensor by a 2-D constant takes the constant with
  leading 1s, so both inputs have one rank (the toolchain makes it a Conv);
- a BatchNormalization below 4-D runs on its input viewed as (N, C, H, 1);
- ReduceMean, ReduceSum and ReduceMax keep their dims and reduce one axis at a
  time, a Reshape dropping the dims after;
- a Slice below 4-D slices its input viewed with leading 1s;
- ArgMax runs along axis 1 of its input viewed as 4-D;
- ReduceL2 is Sqrt(ReduceSum(x·x)); Neg is a Mul by -1;
- a one-hot, Cast(Equal(index, arange)), gathers rows of the identity (GatherElements);
- a Cast of indices to float gathers them from a table of floats, where the
  indices come from a TopK or ArgMax, which bounds them.

Node names stay unique: a rewritten node lends its name as a prefix to the
nodes that replace it. Shapes must be static (evc exports at batch 1).
"""

from __future__ import annotations

import math

import numpy as np

REDUCE = ("ReduceMean", "ReduceSum", "ReduceMax")


def bpu_native(model, counts: dict | None = None):
    """`model` with every rewrite applied in turn, each on freshly inferred shapes; `counts`, if given,
    gets how many nodes each rewrite replaced, by its name."""
    for name, rewrite in REWRITES.items():
        model, count = _apply(model, rewrite)
        if counts is not None and count:
            counts[name] = count
    return model


def _apply(model, rewrite):
    from onnx import shape_inference
    from onnxslim.third_party import onnx_graphsurgeon as gs

    graph = gs.import_onnx(shape_inference.infer_shapes(model))
    changed = sum(bool(rewrite(graph, node)) for node in list(graph.nodes))
    if not changed:
        return model, 0
    graph.cleanup().toposort()
    rewritten = gs.export_onnx(graph)
    rewritten.ir_version, rewritten.producer_name = model.ir_version, model.producer_name
    del rewritten.graph.value_info[:]  # stale shapes of replaced tensors would mislead the next inference
    return rewritten, changed


# ---- small helpers over onnx-graphsurgeon --------------------------------------------------------

def _value(tensor):
    """The constant value of `tensor` (an initializer or a Constant node's output), else None."""
    from onnxslim.third_party import onnx_graphsurgeon as gs

    if isinstance(tensor, gs.Constant):
        return tensor.values
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        return getattr(value, "values", None)
    return None


def _shape(tensor) -> list[int] | None:
    shape = tensor.shape
    if shape is None or any(not isinstance(d, int) for d in shape):
        return None
    return list(shape)


def _producer(tensor, op: str | tuple[str, ...]):
    ops = (op,) if isinstance(op, str) else op
    return tensor.inputs[0] if len(tensor.inputs) == 1 and tensor.inputs[0].op in ops else None


def _const(name: str, value):
    from onnxslim.third_party import onnx_graphsurgeon as gs

    return gs.Constant(name, np.ascontiguousarray(value))


def _var(name: str, like):
    from onnxslim.third_party import onnx_graphsurgeon as gs

    return gs.Variable(name, dtype=like.dtype)


def _node(graph, op, name, inputs, outputs, **attrs):
    from onnxslim.third_party import onnx_graphsurgeon as gs

    node = gs.Node(op, name, attrs, inputs, outputs)
    graph.nodes.append(node)
    return outputs[0] if len(outputs) == 1 else outputs


def _reshape(graph, name, tensor, shape, out=None):
    out = out if out is not None else _var(f"{name}_output", tensor)
    return _node(graph, "Reshape", name, [tensor, _const(f"{name}/shape", np.array(shape, np.int64))], [out])


def _detach(node):
    """The node's outputs, taken from it: the node then feeds nothing and cleanup removes it."""
    outputs = list(node.outputs)
    node.outputs.clear()
    return outputs


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ---- q, k and v as three projections --------------------------------------------------------------

def _qkv_projections(graph, split) -> bool:
    """Transpose(Reshape(projection(x))) split along axis 0 into S pieces -> S projections, 4-D each."""
    pieces = _pieces_along_axis_0(split)
    if pieces is None:
        return False
    transpose = _producer(split.inputs[0], "Transpose")
    reshape = transpose and _producer(transpose.inputs[0], "Reshape")
    consumers = transpose.outputs[0].outputs if transpose else []
    if reshape is None or any(c is not split and c.op != "Gather" for c in consumers):
        return False
    perm, fused, shape = transpose.attrs["perm"], reshape.inputs[0], _shape(reshape.outputs[0])
    projection = _projection(fused)
    if shape is None or _shape(fused) is None or projection is None or len(fused.outputs) != 1:
        return False
    axis = perm[0]
    width = math.prod(shape[axis + 1:])
    if shape[axis] != len(pieces) or math.prod(shape[:axis]) != math.prod(_shape(fused)[:-1]) or \
            _shape(fused)[-1] != shape[axis] * width:
        return False
    piece_shape = shape[:axis] + shape[axis + 1:]
    piece_perm = [p - (p > axis) for p in perm[1:]]
    for _, index, out in pieces:
        name = f"{split.name}/piece_{index}"
        part = projection(graph, name, index * width, (index + 1) * width)
        viewed = _reshape(graph, f"{name}/reshape", part, piece_shape)
        _node(graph, "Transpose", f"{name}/transpose", [viewed], [out], perm=piece_perm)
    for consumer, _, _ in pieces:
        _detach(consumer)
    return True


def _pieces_along_axis_0(node):
    """[(node to replace, piece index, the piece's output)] of a Split or Gather taking size-1 pieces
    of axis 0 of a Transpose's output, each piece squeezed; None if `node` is not such a split."""
    if node.op == "Split" and node.attrs.get("axis", 0) == 0:
        shape = _shape(node.inputs[0])
        if shape is None or len(node.outputs) != shape[0] or len(node.inputs) > 1:
            return None
        if any(s != 1 for s in node.attrs.get("split", [1] * shape[0])):
            return None
        pieces = []
        for index, out in enumerate(node.outputs):
            (squeeze, *more) = out.outputs or [None]
            if more or squeeze is None or squeeze.op != "Squeeze" or squeeze.attrs.get("axes") != [0]:
                return None
            pieces.append((squeeze, index, squeeze.outputs[0]))
        # The Split goes too: its pieces' Squeezes are detached, so cleanup drops it.
        return pieces
    if node.op == "Gather" and node.attrs.get("axis", 0) == 0 and _producer(node.inputs[0], "Transpose"):
        source = node.inputs[0]
        gathers = [c for c in source.outputs]
        if node is not gathers[0] or any(g.op != "Gather" or g.attrs.get("axis", 0) != 0 for g in gathers):
            return None
        indices = [_value(g.inputs[1]) for g in gathers]
        if any(i is None or i.ndim != 0 for i in indices) or _shape(source) is None:
            return None
        if sorted(int(i) for i in indices) != list(range(_shape(source)[0])):
            return None
        return [(g, int(i), g.outputs[0]) for g, i in zip(gathers, indices)]
    return None


def _projection(fused):
    """A function making columns [a, b) of `fused`, a projection by constant weights, else None."""
    gemm = _producer(fused, "Gemm")
    if gemm is not None:
        weight = _value(gemm.inputs[1])
        has_bias = len(gemm.inputs) > 2
        bias = _value(gemm.inputs[2]) if has_bias else None
        if weight is None or gemm.attrs.get("transA", 0) or has_bias and bias is None:
            return None
        trans_b = gemm.attrs.get("transB", 0)

        def gemm_columns(graph, name, a, b):
            w = weight[a:b] if trans_b else weight[:, a:b]
            inputs = [gemm.inputs[0], _const(f"{name}/weight", w)]
            if has_bias:
                inputs.append(_const(f"{name}/bias", bias if bias.size == 1 else bias.reshape(-1)[a:b]))
            return _node(graph, "Gemm", name, inputs, [_var(f"{name}_output", fused)],
                         **{k: v for k, v in gemm.attrs.items() if k != "transA"})
        return gemm_columns
    add = _producer(fused, "Add")
    bias, matmul_out = None, fused
    if add is not None:
        values = [_value(t) for t in add.inputs]
        if sum(v is not None for v in values) != 1:
            return None
        bias = next(v for v in values if v is not None)
        matmul_out = next(t for t, v in zip(add.inputs, values) if v is None)
        if len(matmul_out.outputs) != 1:
            return None
    matmul = _producer(matmul_out, "MatMul")
    weight = matmul and _value(matmul.inputs[1])
    if weight is None or weight.ndim != 2 or bias is not None and bias.shape[-1] != weight.shape[1]:
        return None

    def matmul_columns(graph, name, a, b):
        part = _node(graph, "MatMul", name, [matmul.inputs[0], _const(f"{name}/weight", weight[:, a:b])],
                     [_var(f"{name}_output", fused)])
        if bias is None:
            return part
        return _node(graph, "Add", f"{name}/bias", [part, _const(f"{name}/bias_value", bias[..., a:b])],
                     [_var(f"{name}/bias_output", fused)])
    return matmul_columns


# ---- shapes the operator table wants --------------------------------------------------------------

def _matmul_same_rank(graph, node) -> bool:
    """MatMul(x of rank r, constant W of rank 2) -> MatMul(x, W viewed as 1 x ... x K x N)."""
    if node.op != "MatMul":
        return False
    rank, weight = len(node.inputs[0].shape or ()), _value(node.inputs[1])
    if weight is None or weight.ndim != 2 or rank <= 2:
        return False
    node.inputs[1] = _const(f"{node.name}/weight", weight.reshape((1,) * (rank - 2) + weight.shape))
    return True


def _batch_norm_4d(graph, node) -> bool:
    """BatchNormalization of (N, C) or (N, C, L) -> the same on (N, C, L, 1), viewed back."""
    shape = _shape(node.inputs[0]) if node.op == "BatchNormalization" else None
    if shape is None or len(shape) not in (2, 3):
        return False
    (out,) = _detach(node)
    lifted = _reshape(graph, f"{node.name}/lift", node.inputs[0], shape + [1] * (4 - len(shape)))
    normed = _node(graph, "BatchNormalization", node.name, [lifted, *node.inputs[1:]], [_var(f"{node.name}_4d", out)],
                   **node.attrs)
    _reshape(graph, f"{node.name}/drop", normed, shape, out)
    return True


def _reduce_keepdims(graph, node) -> bool:
    """A Reduce over several axes, or without keepdims -> one keepdims Reduce per axis, then a Reshape."""
    shape = _shape(node.inputs[0]) if node.op in REDUCE else None
    out_shape = _shape(node.outputs[0]) if shape is not None else None
    if out_shape is None:
        return False
    rank = len(shape)
    axes = sorted(_axis(a, rank) for a in node.attrs.get("axes", range(rank)))
    keepdims = node.attrs.get("keepdims", 1)
    one_pass = len(axes) == 1 or (node.op == "ReduceMean" and rank == 4 and axes == [2, 3])
    if keepdims and one_pass:
        return False
    (out,) = _detach(node)
    x = node.inputs[0]
    groups = [axes] if one_pass else [[a] for a in axes]
    for i, group in enumerate(groups):
        name = node.name if i == 0 else f"{node.name}/axis_{group[0]}"
        x = _node(graph, node.op, name, [x], [_var(f"{name}_kept", out)], axes=group, keepdims=1)
    _reshape(graph, f"{node.name}/drop", x, out_shape, out)
    return True


def _slice_4d(graph, node) -> bool:
    """Slice of a 2-D or 3-D tensor -> the same Slice of it viewed with leading 1s, viewed back."""
    shape = _shape(node.inputs[0]) if node.op == "Slice" else None
    out_shape = _shape(node.outputs[0]) if shape is not None else None
    if out_shape is None or len(shape) >= 4:
        return False
    bounds = [_value(t) for t in node.inputs[1:]]
    if any(b is None for b in bounds):
        return False
    pad = 4 - len(shape)
    starts = bounds[0]
    axes = bounds[2] if len(bounds) > 2 else np.arange(len(starts))
    axes = np.array([_axis(int(a), len(shape)) + pad for a in axes], np.int64)
    (out,) = _detach(node)
    lifted = _reshape(graph, f"{node.name}/lift", node.inputs[0], [1] * pad + shape)
    inputs = [lifted, node.inputs[1], node.inputs[2], _const(f"{node.name}/axes", axes), *node.inputs[4:]]
    sliced = _node(graph, "Slice", node.name, inputs, [_var(f"{node.name}_4d", out)])
    _reshape(graph, f"{node.name}/drop", sliced, out_shape, out)
    return True


def _argmax_axis_1(graph, node) -> bool:
    """ArgMax along axis a of shape s -> ArgMax along axis 1 of s viewed as (s[:a], s[a], s[a+1:], 1)."""
    shape = _shape(node.inputs[0]) if node.op == "ArgMax" else None
    out_shape = _shape(node.outputs[0]) if shape is not None else None
    if out_shape is None:
        return False
    axis = _axis(node.attrs.get("axis", 0), len(shape))
    if len(shape) == 4 and axis == 1 and node.attrs.get("keepdims", 1):
        return False
    (out,) = _detach(node)
    viewed = [math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:]), 1]
    lifted = _reshape(graph, f"{node.name}/lift", node.inputs[0], viewed)
    found = _node(graph, "ArgMax", node.name, [lifted], [_var(f"{node.name}_4d", out)], axis=1, keepdims=1)
    _reshape(graph, f"{node.name}/drop", found, out_shape, out)
    return True


def _reduce_l2(graph, node) -> bool:
    """ReduceL2 -> Sqrt(ReduceSum(x * x)), which the BPU runs (ReduceL2 is the CPU's alone)."""
    if node.op != "ReduceL2":
        return False
    (out,) = _detach(node)
    x = node.inputs[0]
    squared = _node(graph, "Mul", f"{node.name}/square", [x, x], [_var(f"{node.name}/square_output", x)])
    summed = _node(graph, "ReduceSum", f"{node.name}/sum", [squared], [_var(f"{node.name}/sum_output", x)],
                   **node.attrs)
    _node(graph, "Sqrt", node.name, [summed], [out])
    return True


def _neg(graph, node) -> bool:
    """Neg -> Mul by -1."""
    if node.op != "Neg":
        return False
    (out,) = _detach(node)
    minus = _const(f"{node.name}/minus_one", np.array(-1, dtype=out.dtype or np.float32))
    _node(graph, "Mul", node.name, [node.inputs[0], minus], [out])
    return True


# ---- indices without Cast or Equal ----------------------------------------------------------------

def _one_hot(graph, cast) -> bool:
    """Cast(Equal(index (..., k, 1), arange(n))) -> GatherElements(identity, index expanded to (..., k, n))."""
    from onnx import TensorProto

    if cast.op != "Cast" or cast.attrs.get("to") != TensorProto.FLOAT:
        return False
    equal = _producer(cast.inputs[0], "Equal")
    if equal is None or len(cast.inputs[0].outputs) != 1:
        return False
    values = [_value(t) for t in equal.inputs]
    if values[1] is None or values[0] is not None:
        return False
    index, n = equal.inputs[0], values[1].size
    shape = _shape(index)
    if shape is None or shape[-1] != 1 or not np.array_equal(values[1].reshape(-1), np.arange(n)):
        return False
    (out,) = _detach(cast)
    wide = shape[:-1] + [n]
    expanded = _node(graph, "Expand", f"{cast.name}/expand", [index, _const(f"{cast.name}/shape", np.array(
        wide, np.int64))], [_var(f"{cast.name}/expand_output", index)])
    rows = np.broadcast_to(np.eye(n, dtype=np.float32), tuple(shape[:-2]) + (n, n))
    _node(graph, "GatherElements", cast.name, [_const(f"{cast.name}/identity", rows), expanded], [out],
          axis=len(shape) - 2)
    return True


def _index_cast(graph, cast) -> bool:
    """Cast(indices -> float) -> GatherElements from a table 0, 1, ..., bound - 1, with the bound the
    size of the axis a TopK or ArgMax took the indices along."""
    from onnx import TensorProto

    if cast.op != "Cast" or cast.attrs.get("to") != TensorProto.FLOAT:
        return False
    shape, bound = _shape(cast.inputs[0]), _index_bound(cast.inputs[0])
    if shape is None or bound is None or not shape:
        return False
    (out,) = _detach(cast)
    table = np.broadcast_to(np.arange(bound, dtype=np.float32), tuple(shape[:-1]) + (bound,))
    _node(graph, "GatherElements", cast.name, [_const(f"{cast.name}/table", table), cast.inputs[0]], [out],
          axis=len(shape) - 1)
    return True


def _index_bound(tensor, depth: int = 8) -> int | None:
    """An exclusive upper bound of the integer values of `tensor`, read from where they were made."""
    node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if node is None or depth == 0:
        return None
    if node.op in ("TopK", "ArgMax") and tensor is node.outputs[-1]:
        shape = _shape(node.inputs[0])
        return None if shape is None else shape[_axis(node.attrs.get("axis", -1 if node.op == "TopK" else 0),
                                                      len(shape))]
    if node.op in ("Slice", "Squeeze", "Unsqueeze", "Reshape", "Expand", "Transpose", "Flatten",
                   "Gather", "GatherElements"):
        return _index_bound(node.inputs[0], depth - 1)
    return None


REWRITES = {  # in order: the q/k/v projections first, so that the rank rewrite sees their MatMuls
    "q, k and v split along axis 0 of a 5-D tensor -> three projections": _qkv_projections,
    "MatMul by a 2-D constant -> the constant at the input's rank": _matmul_same_rank,
    "BatchNormalization below 4-D -> on a 4-D view": _batch_norm_4d,
    "Reduce without keepdims or over several axes -> keepdims, one axis at a time": _reduce_keepdims,
    "Slice below 4-D -> on a 4-D view": _slice_4d,
    "ArgMax not along axis 1 of a 4-D tensor -> on a 4-D view, axis 1": _argmax_axis_1,
    "ReduceL2 -> Sqrt(ReduceSum(x * x))": _reduce_l2,
    "Neg -> Mul by -1": _neg,
    "one-hot Cast(Equal(index, arange)) -> GatherElements of the identity": _one_hot,
    "Cast of TopK/ArgMax indices to float -> GatherElements of a table": _index_cast,
}
