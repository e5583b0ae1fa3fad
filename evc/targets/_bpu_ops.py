"""The operator check for a D-Robotics BPU: each node of an ONNX graph against the device's operator table.

    report = check_ops(onnx_model, DEVICES["rdk_x5"].facts, node_info={"softmax_0"})
    report["summary"]      # {"bpu": 530, "cpu": 12, "unsupported": 0, "folded": ...}

The table and its limits are data (evc/targets/devices/<device>.json); this module
only knows how to test a limit against a node's shapes and attributes. A limit
the shapes cannot settle is reported as unchecked, never claimed for the BPU.
"""

from __future__ import annotations

import math

from evc.errors import BuildError

OP_CHECK = "op_check.json"  # the full report, beside the model in the bundle

SCOPE = ("the device's published operator table applied to this model.onnx, node by node; hb_mapper's own "
         "graph rewrites and fusions, which can move a node, happen only in the toolchain")


def check_ops(model, facts: dict, node_info: set[str]) -> dict:
    """Each node of `model` against `facts['ops']`: on the BPU, falling back to the CPU (why), or unsupported.

    Returns {"march", "scope", "summary": {bpu, cpu, unsupported, folded}, "nodes": [...]}; a node's
    "unchecked" lists the limits its shapes could not settle here.
    """
    from onnx import shape_inference

    graph = ShapedGraph(shape_inference.infer_shapes(model))
    nodes = [_place(node, facts, graph, node_info) for node in model.graph.node]
    summary = {k: sum(n["on"] == k for n in nodes) for k in ("bpu", "cpu", "unsupported", "folded")}
    return {"march": facts["march"], "scope": SCOPE, "summary": summary, "nodes": nodes}


def require_supported(report: dict, facts: dict) -> None:
    """A node the toolchain cannot take at all stops the build here rather than on the user's PC."""
    bad = [f"{n['node']} ({n['op']})" for n in report["nodes"] if n["on"] == "unsupported"]
    if bad:
        raise BuildError(f"{len(bad)} node(s) the {facts['march']} BPU toolchain cannot take: {', '.join(bad)}")


def summary_of(report: dict) -> dict:
    """What the manifest keeps of the check: counts, and every node that is not plainly on the BPU."""
    return {"march": report["march"], "summary": report["summary"], "report": OP_CHECK,
            "cpu": [n for n in report["nodes"] if n["on"] == "cpu"],
            "unsupported": [n for n in report["nodes"] if n["on"] == "unsupported"],
            "unchecked": [n for n in report["nodes"] if n.get("unchecked")]}


def _place(node, facts: dict, graph: ShapedGraph, node_info: set[str]) -> dict:
    row = {"node": node.name, "op": node.op_type}
    rule = facts["ops"].get(node.op_type)
    if rule is None:
        return {**row, "on": "unsupported", "why": f"{node.op_type} is not in the {facts['march']} operator table"}
    if rule["on"] == "unsupported":
        return {**row, "on": "unsupported", "why": f"the {facts['march']} toolchain does not support {node.op_type}"}
    if rule["on"] == "folded":
        return {**row, "on": "folded"}
    if rule["on"] == "cpu":
        return {**row, "on": "cpu", "why": f"{node.op_type} runs only on the CPU"}
    if rule["on"] == "bpu_with_node_info" and node.name not in node_info:
        return {**row, "on": "cpu", "why": f"{node.op_type} runs on the CPU unless node_info names it"}
    failed, unchecked = [], []
    for key, limit in [("tensors", facts["tensors"]), *rule.items()]:
        found = _LIMITS[key](node, limit, graph) if key in _LIMITS else None
        if isinstance(found, Unchecked):
            unchecked.append(found)
        elif found:
            failed.append(found)
    if rule["on"] == "bpu_with_node_info":
        row["via"] = "node_info, " + ", ".join(f"{k} {v}" for k, v in facts["node_info"]["setting"].items())
    if failed:
        return {**row, "on": "cpu", "why": "; ".join(failed)}
    return {**row, "on": "bpu", **({"unchecked": unchecked} if unchecked else {})}


class Unchecked(str):
    """A limit this node's shapes or inputs cannot settle here."""


class ShapedGraph:
    """Shapes, dtypes and constants of a shape-inferred ONNX graph."""

    def __init__(self, model):
        from onnx import numpy_helper

        values = [*model.graph.value_info, *model.graph.input, *model.graph.output]
        self.shapes = {v.name: _dims(v) for v in values}
        self.dtypes = {v.name: v.type.tensor_type.elem_type for v in values}
        self.constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        for name, value in self.constants.items():
            self.shapes.setdefault(name, list(value.shape))

    def shape(self, name: str) -> list[int] | None:
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)


def _dims(value) -> list[int] | None:
    t = value.type.tensor_type
    if not t.HasField("shape") or any(not d.HasField("dim_value") for d in t.shape.dim):
        return None
    return [d.dim_value for d in t.shape.dim]


def attribute(node, name: str):
    from onnx import defs, helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    schema = defs.get_schema(node.op_type, 11)  # the opset the BPU toolchain reads
    default = schema.attributes[name].default_value if name in schema.attributes else None
    if default is None or not default.name:
        return None
    value = helper.get_attribute_value(default)
    return value.decode() if isinstance(value, bytes) else value


def _span(low: int, high: int) -> str:
    return f"{low}-D" if low == high else f"{low}- to {high}-D"


def _unknown(what: str) -> Unchecked:
    return Unchecked(f"{what}: shape unknown after shape inference")


def _tensors(node, limit, graph):
    for out in node.output:
        shape = graph.shape(out)
        if shape is None:
            continue
        if len(shape) == limit["rank"]:
            n, *chw = shape
            if n > limit["batch_max"] or not all(limit["hwc"][0] <= d <= limit["hwc"][1] for d in chw):
                return f"output {shape} is outside N <= {limit['batch_max']}, C, H, W in {limit['hwc']}"
        size = math.prod(shape)
        if size > limit["elements_max"]:
            return f"output of {size} elements exceeds {limit['elements_max']}"
    return None


def _rank(node, limit, graph):
    rank = graph.rank(node.input[0])
    if rank is None:
        return _unknown("rank")
    if not limit[0] <= rank <= limit[1]:
        return f"input is {rank}-D; the BPU takes {_span(*limit)}"
    return None


def _constant_inputs_max(node, limit, graph):
    count = sum(name in graph.constants for name in node.input)
    return f"{count} constant inputs; the BPU takes at most {limit}" if count > limit else None


def _scalar_constant_input(node, index, graph):
    value = graph.constants.get(node.input[index]) if len(node.input) > index else None
    return None if value is not None and value.size == 1 else f"input {index} is not a constant scalar"


def _same_rank(node, _, graph):
    a, b = graph.rank(node.input[0]), graph.rank(node.input[1])
    if a is None or b is None:
        return _unknown("ranks")
    return f"inputs are {a}-D and {b}-D; the BPU wants one rank" if a != b else None


def _mk_max(node, limit, graph):
    shape = graph.shape(node.input[0])
    if shape is None or len(shape) < 2:
        return _unknown("M and K")
    m, k = shape[-2:]
    return f"M {m}, K {k}: the BPU takes at most {limit}" if max(m, k) > limit else None


def _batch_dims_max(node, limit, graph):
    shapes = [graph.shape(name) for name in node.input[:2]]
    if None in shapes:
        return _unknown("batch dims")
    big = [d for s in shapes for d in s[:-2] if d > limit]
    return f"batch dims {big} exceed {limit}" if big else None


def _broadcast_second_only(node, _, graph):
    a, b = (graph.shape(name) for name in node.input[:2])
    if a is None or b is None:
        return _unknown("broadcasting")
    if any(x != y and y != 1 for x, y in zip(a[:-2], b[:-2])):
        return f"{a} x {b} broadcasts the first input; the BPU broadcasts only the second"
    return None


def _channels(node, graph) -> tuple[int, int, int, list[int]] | None:
    """(input channels, output channels, input channels per group, kernel) of a Conv, ConvTranspose or Gemm."""
    weight = graph.shape(node.input[1])
    if weight is None:
        return None
    groups = attribute(node, "group") or 1
    if node.op_type == "Gemm":
        k, n = (weight[1], weight[0]) if attribute(node, "transB") else weight
        return k, n, k, [1, 1]
    if node.op_type == "ConvTranspose":
        return weight[0], weight[1] * groups, weight[0] // groups, weight[2:]
    return weight[1] * groups, weight[0], weight[1], weight[2:]


def _channels_max(node, limit, graph):
    if node.op_type in ("ArgMax", "ArgMin"):
        shape = graph.shape(node.input[0])
        if shape is None:
            return _unknown("channels")
        return f"{shape[1]} channels; the BPU takes at most {limit}" if shape[1] > limit else None
    found = _channels(node, graph)
    if found is None:
        return _unknown("channels")
    c, n = found[:2]
    return f"{c} in, {n} out channels; the BPU takes at most {limit}" if max(c, n) > limit else None


def _channels_kernel_max(node, limit, graph):
    found = _channels(node, graph)
    if found is None:
        return _unknown("channels x kernel")
    _, _, c, kernel = found
    product = c * math.prod(kernel)
    return f"C x kH x kW = {product} exceeds {limit}" if product > limit else None


def _kernel(node, limit, graph):
    found = _channels(node, graph)
    if found is None:
        return _unknown("kernel")
    kernel = found[3]
    return f"kernel {kernel} is outside [{limit[0]}, {limit[1]}]" if any(
        not limit[0] <= k <= limit[1] for k in kernel) else None


def _attribute_max(name: str, what: str):
    def check(node, limit, graph):
        values = attribute(node, name) or []
        return f"{what} {values} exceeds {limit}" if any(v > limit for v in values) else None
    return check


def _kernel_area_max(node, limit, graph):
    area = math.prod(attribute(node, "kernel_shape") or [])
    return f"kernel area {area} exceeds {limit}" if area > limit else None


def _axis_not(node, excluded, graph):
    rank = graph.rank(node.input[0])
    axis = attribute(node, "axis")
    if rank is None:
        return _unknown("axis")
    axis = axis + rank if axis < 0 else axis
    return f"along axis {axis} (N); the BPU does not {node.op_type.lower()} along N" if axis in excluded else None


def uneven_split(node, _, graph):
    split = attribute(node, "split")
    if split is None and len(node.input) > 1:
        value = graph.constants.get(node.input[1])
        split = None if value is None else value.tolist()
    return f"uneven split {list(split)}" if split and len(set(split)) > 1 else None


def _computed_indices(node, dtype, graph):
    from onnx import TensorProto

    indices = node.input[1]
    if indices in graph.constants:
        return None
    kind = graph.dtypes.get(indices)
    if kind is None:
        return Unchecked(f"computed indices of unknown type; the BPU wants {dtype}")
    found = TensorProto.DataType.Name(kind).lower()
    return f"computed {found} indices; the BPU wants {dtype}" if found != dtype else None


def _changed_dims_max(node, limit, graph):
    before, after = graph.shape(node.input[0]), graph.shape(node.output[0])
    if before is None or after is None:
        return _unknown("changed dims")
    before = [1] * (len(after) - len(before)) + before
    changed = sum(x != y for x, y in zip(before, after))
    return f"{changed} dims change; the BPU changes at most {limit}" if changed > limit else None


def _attributes(node, wanted: dict, graph):
    wrong = [f"{k} = {attribute(node, k)!r}" for k, v in wanted.items() if attribute(node, k) != v]
    if not wrong:
        return None
    return f"{', '.join(wrong)}; the BPU takes " + ", ".join(f"{k} = {v!r}" for k, v in wanted.items())


def _axes(node, rule, graph):
    rank = graph.rank(node.input[0])
    if rank is None:
        return _unknown("axes")
    axes = sorted(a + rank if a < 0 else a for a in (attribute(node, "axes") or range(rank)))
    if len(axes) <= rule["count"] or (rule.get("or_height_and_width") and rank == 4 and axes == [2, 3]):
        return None
    also = " or H and W" if rule.get("or_height_and_width") else ""
    return f"reduces axes {axes}; the BPU reduces one axis{also}"


def _resizes_height_and_width_only(node, _, graph):
    scales, sizes = (graph.constants.get(name) for name in (list(node.input) + ["", ""])[2:4])
    if scales is not None and scales.size:
        kept = list(scales[:2]) == [1, 1]
    elif sizes is not None and sizes.size and graph.shape(node.input[0]):
        kept = list(sizes[:2]) == graph.shape(node.input[0])[:2]
    else:
        return Unchecked("scales and sizes are computed; the BPU resizes only H and W")
    return None if kept else "resizes N or C; the BPU resizes only H and W"


_LIMITS = {
    "tensors": _tensors,
    "rank": _rank,
    "constant_inputs_max": _constant_inputs_max,
    "scalar_constant_input": _scalar_constant_input,
    "same_rank": _same_rank,
    "mk_max": _mk_max,
    "batch_dims_max": _batch_dims_max,
    "broadcast_second_only": _broadcast_second_only,
    "channels_max": _channels_max,
    "channels_kernel_max": _channels_kernel_max,
    "kernel": _kernel,
    "stride_max": _attribute_max("strides", "stride"),
    "dilation_max": _attribute_max("dilations", "dilation"),
    "kernel_max": _attribute_max("kernel_shape", "kernel"),
    "kernel_area_max": _kernel_area_max,
    "axis_not": _axis_not,
    "even": uneven_split,
    "computed_indices": _computed_indices,
    "changed_dims_max": _changed_dims_max,
    "attributes": _attributes,
    "axes": _axes,
    "resizes_height_and_width_only": _resizes_height_and_width_only,
}
