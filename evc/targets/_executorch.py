"""The pte format's work with ExecuTorch: export, int8 quantization, XNNPACK lowering, where operators run.

    edge = lowered_module(module, (example,), calibration_images)   # an EdgeProgramManager, lowered to XNNPACK
    placed = delegation(edge)                      # per operator: delegated or portable; every portable node
    edge.to_executorch().buffer                    # the .pte's bytes

A failure to export or lower raises LoweringFailed naming the graph node at
fault, so a user's model that ExecuTorch cannot take says where, not only
what; the lower stage reports it as the target's failure (exit 1).
"""

from __future__ import annotations

import re
from collections import Counter
from contextlib import contextmanager

from evc.errors import first_line

BACKEND = "XnnpackBackend"
# Tuple access after a multi-output op: bookkeeping, not an operator that runs anywhere.
NOT_OPERATORS = {"getitem"}
QUANTIZE_NAMESPACE = "quantized_decomposed."


def lowered_module(module, args: tuple, images=None):
    """`module` on `args`, exported, quantized when `images` are given, and lowered to XNNPACK."""
    import torch

    from evc.targets._quantized import quiet

    module = module.eval()
    with quiet(), torch.no_grad(), _at_fault(module):
        exported = torch.export.export(module, args)
        if images is not None:
            exported = torch.export.export(quantized(exported, images), args)
        return _partitioned(exported)


def quantized(exported, images):
    """The exported module with int8 weights and activations, ExecuTorch's flow: XNNPACKQuantizer's symmetric
    config (weights per output channel), torchao's prepare_pt2e / convert_pt2e, one image at a time."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    observed = prepare_pt2e(exported.module(), quantizer)
    for image in images:
        observed(torch.from_numpy(image[None]))
    return convert_pt2e(observed)


def _partitioned(exported):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    return to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])


def delegation(edge) -> dict:
    """Where each operator of the lowered program runs: counts per operator in XNNPACK's partitions and in the
    portable graph (quantize/dequantize counted apart), and every portable node with the node of the Program's
    graph and the module it came from."""
    graph_module = edge.exported_program().graph_module
    delegated, portable, nodes, partitions = Counter(), Counter(), [], 0
    for node in graph_module.graph.nodes:
        if node.op == "get_attr" and node.name.startswith("lowered_module_"):
            partitions += 1
            inner = getattr(graph_module, node.name).original_module.graph.nodes
            delegated.update(_op(n) for n in inner if n.op == "call_function" and _op(n) not in NOT_OPERATORS)
        elif node.op == "call_function" and _op(node) not in NOT_OPERATORS | {"executorch_call_delegate"}:
            portable[_op(node)] += 1
            nodes.append({"node": node.name, "op": _op(node), "from": _source_node(node), "module": _module_of(node)})
    ops = {op: {"delegated": delegated[op], "portable": portable[op]} for op in sorted(delegated | portable)}

    def total(where: Counter, quantize: bool) -> int:
        return sum(n for op, n in where.items() if op.startswith(QUANTIZE_NAMESPACE) == quantize)

    return {"backend": BACKEND, "partitions": partitions,
            "delegated": total(delegated, False), "portable": total(portable, False),
            "quantize_ops": {"delegated": total(delegated, True), "portable": total(portable, True)},
            "ops": ops, "portable_nodes": nodes}


def delegation_summary(placed: dict) -> dict:
    """What the manifest keeps of `delegation`: the counts, and the operators left portable."""
    return {**{k: v for k, v in placed.items() if k != "portable_nodes"},
            "portable_ops": sorted({n["op"] for n in placed["portable_nodes"]})}


def _op(node) -> str:
    """An edge operator's name as ExecuTorch writes it: aten.linear.default."""
    return getattr(node.target, "__name__", str(node.target))


def _source_node(node) -> str | None:
    """The node of the Program's graph an exported node descends from (torch.export's provenance chain)."""
    source = (node.meta.get("from_node") or [None])[-1]
    while source is not None and source.from_node:
        source = source.from_node[-1]
    return source.name if source is not None else None


def _module_of(node) -> str | None:
    """The module a node of the exported program came from, as the model names it (blocks.0.norm1)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return re.sub(r"^L\['self'\]\.?|^L__self___", "", path) or None


def set_threads(threads: int) -> None:
    """XNNPACK's thread pool in ExecuTorch's Python runtime, for the whole process. A program's XNNPACK
    partitions hold the pool they were loaded with, and a reset frees it (running one afterwards crashed or hung
    here), so the pool is made anew only when the count changes, before the programs that use it are loaded."""
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count, _unsafe_reset_threadpool

    if _threadpool_get_thread_count() != threads:
        _unsafe_reset_threadpool(threads)


def version() -> str:
    from importlib.metadata import version as installed

    return installed("executorch")


class LoweringFailed(Exception):
    """ExecuTorch could not export or lower the model; the message names the node at fault where it is known."""


@contextmanager
def _at_fault(module):
    """Turn an export or lowering failure into LoweringFailed naming the node of `module`'s graph it failed at:
    the innermost frame of the graph's own generated code, or a node whose operator the message names."""
    try:
        yield
    except Exception as e:
        node = _node_in_trace(module, e.__traceback__) or _node_named_in(module, str(e))
        where = f"at node '{node.name}' ({_described(node)}): " if node is not None else ""
        raise LoweringFailed(f"{where}{first_line(e)}") from e


def _node_in_trace(module, trace):
    """The graph node whose line of the GraphModule's generated code the traceback passed through last."""
    import linecache

    graph = getattr(module, "graph", None)
    if graph is None:
        return None
    by_name = {n.name: n for n in graph.nodes}
    found = None
    while trace is not None:
        code = trace.tb_frame.f_code
        if code.co_filename.startswith("<eval_with_key"):
            line = linecache.getline(code.co_filename, trace.tb_lineno).strip()
            match = re.match(r"(\w+)\s*=", line)
            if match and match.group(1) in by_name:
                found = by_name[match.group(1)]
        trace = trace.tb_next
    return found


def _node_named_in(module, message: str):
    """The first node of `module`'s graph whose operator the message names (aten.median.dim, median)."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return None
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if re.search(rf"\b{re.escape(name)}\b", message):
            return node
    return None


def _described(node) -> str:
    if node.op == "call_module":
        return f"{type(node.graph.owning_module.get_submodule(node.target)).__name__} {node.target}"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))
