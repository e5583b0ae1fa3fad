"""A .tflite's operators, read from its flatbuffer with LiteRT's schema: for the tflite format's op report and
for Vela's placement (which operators its output keeps as themselves).

    operators(Path("model.tflite"))     # [("CONV_2D", "tensor name"), ..., ("ethos-u", ...)]
"""

from __future__ import annotations

from pathlib import Path


def operators(path: Path) -> list[tuple[str, str]]:
    """(op name, its first output tensor's name) for every op of a .tflite, subgraph by subgraph; a custom op
    by its custom code."""
    from ai_edge_litert import schema_py_generated as schema

    builtin_names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    model = schema.Model.GetRootAs(path.read_bytes(), 0)
    names = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())  # older files fill only the deprecated one
        names.append(code.CustomCode().decode() if builtin == schema.BuiltinOperator.CUSTOM
                     else builtin_names[builtin])
    ops = []
    for graph in (model.Subgraphs(i) for i in range(model.SubgraphsLength())):
        for j in range(graph.OperatorsLength()):
            op = graph.Operators(j)
            output = graph.Tensors(op.Outputs(0)).Name().decode() if op.OutputsLength() else ""
            ops.append((names[op.OpcodeIndex()], output))
    return ops
