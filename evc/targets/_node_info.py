"""config.yaml's node_info: the nodes of model.onnx that hb_mapper runs on the BPU in int16, by the names it reads.

    node_info_names(model, facts, ("softmax", "layernorm"))
    # ['/norm1/ReduceMean', '/norm1/Sub', ..., '/norm1/Div_mul', '/Softmax', ...]
    int16_inputs_outputs(model, {"/norm1/Div_mul": {...}}, facts["node_info"]["renamed"])

A part is a structure of the exported graph:
- `softmax`: each Softmax node;
- `layernorm`: each LayerNorm, which opset 11 has no op for: it exports as
  d = x - ReduceMean(x); d / Sqrt(ReduceMean(Pow(d, 2)) + eps), then the affine Mul and Add.

Which op types of a part node_info names is the device's data (facts["node_info"]["parts"]),
and so is the name hb_mapper gives a node it rewrites before it reads node_info
(facts["node_info"]["renamed"]: a Div is split into `<name>_reciprocal` and `<name>_mul`).
"""

from __future__ import annotations

from evc.errors import BuildError


def node_info_names(model, facts: dict, parts) -> list[str]:
    """The names node_info gives the nodes of `parts` in `model` (whose node names are unique), in graph order,
    as hb_mapper will see them."""
    named = set()
    for part in parts:
        ops = set(facts["node_info"]["parts"][part])
        named |= {node.name for instance in PARTS[part](model) for node in instance if node.op_type in ops}
    renamed = facts["node_info"].get("renamed", {})
    return [_toolchain_name(node, renamed) for node in model.graph.node if node.name in named]


def parts_named(model, facts: dict, parts) -> dict[str, dict]:
    """How many of each part `model` has, and the op types of it node_info names:
    {"softmax": {"count": 12, "ops": ["Softmax"]}, "layernorm": {"count": 25, "ops": [...]}}."""
    return {part: {"count": len(PARTS[part](model)), "ops": facts["node_info"]["parts"][part]} for part in parts}


def int16_inputs_outputs(model, node_info: dict, renamed: dict) -> set[str]:
    """The tensors of `model` that `node_info` (config.yaml's, as written) puts at int16: the inputs it names
    with `InputType` (or `InputType<i>` for input i) and the outputs it names with `OutputType`.

    A name hb_mapper gives a node it rewrites maps back to that node, with only the inputs the two share:
    `<Div>_mul` is the Div's dividend times the divisor's reciprocal, so its input 0 is the Div's input 0,
    its input 1 (the reciprocal) is no tensor of `model`, and its output is the Div's.
    """
    by_name = {}
    for node in model.graph.node:
        by_name[node.name] = (node, list(range(len(node.input))))
        rule = renamed.get(node.op_type)
        if rule:
            by_name[rule["node_info"].format(name=node.name)] = (node, rule["inputs"])
    wide = set()
    for name, setting in node_info.items():
        if name not in by_name:
            raise BuildError(f"config.yaml: node_info names '{name}', which is no node of model.onnx "
                             "(nor a name hb_mapper gives one it rewrites)")
        node, inputs = by_name[name]
        for i, onnx_input in enumerate(inputs):
            if setting.get(f"InputType{i}", setting.get("InputType")) == "int16":
                wide.add(node.input[onnx_input])
        if setting.get("OutputType") == "int16":
            wide.update(node.output)
    return wide


def _toolchain_name(node, renamed: dict) -> str:
    rule = renamed.get(node.op_type)
    return rule["node_info"].format(name=node.name) if rule else node.name


def softmaxes(model) -> list[list]:
    """Each Softmax, as a part of one node."""
    return [[node] for node in model.graph.node if node.op_type == "Softmax"]


def layer_norms(model) -> list[list]:
    """Each LayerNorm of an opset-11 export, as its normalising nodes in order: ReduceMean (the mean), Sub,
    Pow, ReduceMean (the variance), Add (eps), Sqrt, Div. Found by their wiring, not by their names."""
    producer = {out: node for node in model.graph.node for out in node.output}

    def made_by(tensor, op):
        node = producer.get(tensor)
        return node if node is not None and node.op_type == op else None

    found = []
    for div in (n for n in model.graph.node if n.op_type == "Div"):
        root = made_by(div.input[1], "Sqrt")
        epsilon = root and made_by(root.input[0], "Add")
        variance = epsilon and next((made_by(t, "ReduceMean") for t in epsilon.input if made_by(t, "ReduceMean")),
                                    None)
        square = variance and made_by(variance.input[0], "Pow")
        centre = made_by(div.input[0], "Sub")
        mean = centre and made_by(centre.input[1], "ReduceMean")
        if square and mean and square.input[0] == div.input[0] and mean.input[0] == centre.input[0]:
            found.append([mean, centre, square, variance, epsilon, root, div])
    return found


PARTS = {"softmax": softmaxes, "layernorm": layer_norms}  # each part's instances, as lists of nodes
