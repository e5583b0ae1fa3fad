"""Trace a model into an FX GraphModule whose nodes carry their shapes.

    gm = trace(model, torch.randn(1, 3, 224, 224))
    gm.graph                                   # one node per op, module call or parameter
    node.meta["tensor_meta"].shape             # every tensor-valued node has one

Linear, Conv2d and LayerNorm stay whole (`call_module`) even when a model
subclasses them, so recognition and surgery find them by module name. timm
models trace through timm's own lists of modules and functions not to trace
into; any other nn.Module traces with plain torch.fx. nn.MultiheadAttention
is traced as the same computation in plain ops (`evc.ir.attention`), so its
heads are seen. Where torch.fx cannot trace (Hugging Face models branch on
their inputs; einops dispatches on the tensor's type), torch.export captures
the model on the example instead, written back in the same vocabulary
(`evc.ir.export`); so it does where one of timm's no-trace modules holds layers
(EfficientViT's windowed attention branches on the input's size). Either way
the graph returns one tensor (`evc.ir.outputs`).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import sys

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from evc.errors import InputError, first_line
from evc.ir.attention import traceable_attention
from evc.ir.constants import fold_constants
from evc.ir.export import exported
from evc.ir.outputs import OneOutput, one_output

_WHOLE = (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping `_WHOLE` subclasses and timm's no-trace modules as leaves."""

    def __init__(self, leaf_types: tuple[type, ...], autowrap: tuple):
        super().__init__(autowrap_functions=autowrap)
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _WHOLE + self.leaf_types) or super().is_leaf_module(m, qualname)


def _timm_no_trace() -> tuple[tuple[type, ...], tuple]:
    """timm's registered leaf modules and autowrapped functions, if timm is loaded at all."""
    if "timm" not in sys.modules:
        return (), ()
    from timm.layers import get_notrace_functions, get_notrace_modules

    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


def _fixed_defaults(model: nn.Module) -> dict:
    """forward's defaulted arguments (timm's `attn_mask=None`), traced as the constants they default to."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in params if p.kind in kinds and p.default is not p.empty}


def _drop_fixed_inputs(graph: fx.Graph) -> None:
    """Remove fixed arguments' placeholders and fx's checks on them: the program takes the image alone."""
    output = next(n for n in graph.nodes if n.op == "output")
    for placeholder in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        downstream = {placeholder}
        for node in graph.nodes:
            if any(a in downstream for a in node.all_input_nodes):
                downstream.add(node)
        if output not in downstream:
            for node in reversed([n for n in graph.nodes if n in downstream]):
                graph.erase_node(node)


class _ShapeProp(ShapeProp):
    """torch.fx's ShapeProp, remembering the node it is at so a failure can name it, and
    recording the value of every size read from a tensor (`b, n, c = x.shape`) as
    `node.meta["value"]`: surgery rewrites a width the graph computes that way."""

    def run_node(self, n: fx.Node):
        self.node = n
        result = super().run_node(n)
        n.meta.pop("value", None)
        if type(result) is int or (isinstance(result, tuple) and all(type(i) is int for i in result)):
            n.meta["value"] = result
        return result


def _reason(error: Exception) -> str:
    first = first_line(error)
    return first if len(first) <= 200 else first[:197] + "..."


def trace(model: nn.Module, example: torch.Tensor, name: str | None = None, output: str | None = None
          ) -> fx.GraphModule:
    """Capture `model` (put in eval mode) returning the one tensor `output` names (`evc.ir.outputs`),
    and record every node's shape on `example`. torch.fx traces it symbolically; where it cannot,
    torch.export captures it on `example` (`evc.ir.export`)."""
    name = name or type(model).__name__
    model = traceable_attention(model.eval())
    leaf_types, autowrap = _timm_no_trace()
    try:
        graph = _Tracer(leaf_types, autowrap).trace(model, concrete_args=_fixed_defaults(model))
    except Exception as e:  # torch.fx raises many types; all mean "not symbolically traceable"
        gm = _exported(model, example, name, output, e)
    else:
        _drop_fixed_inputs(graph)
        gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
        _select_output(gm, output, name)
        if _opaque(gm):  # a leaf timm keeps whole hides layers (EfficientViT's LocalWindowAttention)
            with contextlib.suppress(Exception):  # where export fails too, recognition names the leaf
                captured = exported(OneOutput(model, output, name), example)
                gm = fx.GraphModule(captured, captured.graph, class_name=type(model).__name__)
    _softmax_as_function(gm)
    fold_constants(gm)
    gm = retraced(gm)
    propagate_shapes(gm, example, name)
    return gm


class _KeepModules(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def retraced(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` re-traced from its own code, as loading a saved GraphModule does, so its node names are
    the ones a cached copy will have (ops numbered in graph order, constants an ATen call made from
    no tensor stored as tensors): a structure recognised on it names nodes the cached copy has."""
    gm.recompile()
    return fx.GraphModule(gm, _KeepModules().trace(gm), class_name=gm.__class__.__name__)


def _opaque(gm: fx.GraphModule) -> bool:
    """Whether a module called whole holds weights that are not one layer's: torch.fx stops at
    timm's no-trace modules, whose branches on the input's size only a capture on it resolves."""
    def is_opaque(m: nn.Module) -> bool:
        ours = isinstance(m, _WHOLE) or type(m).__module__.startswith("torch.nn")
        return not ours and next(m.parameters(), None) is not None

    return any(n.op == "call_module" and is_opaque(gm.get_submodule(n.target)) for n in gm.graph.nodes)


def _softmax_as_function(gm: fx.GraphModule) -> None:
    """nn.Softmax modules (Swin's) as the torch.softmax they call: attention is found by its softmax."""
    for node in list(gm.graph.nodes):
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, nn.Softmax):
            with gm.graph.inserting_before(node):
                function = gm.graph.call_function(torch.softmax, (node.args[0], module.dim))
            node.replace_all_uses_with(function)
            gm.graph.erase_node(node)
    gm.recompile()


def _exported(model: nn.Module, example: torch.Tensor, name: str, output: str | None, fx_error: Exception):
    try:
        gm = exported(OneOutput(model, output, name), example)
    except InputError:
        raise
    except Exception as e:  # torch.export raises many types too
        raise InputError(f"cannot trace model '{name}': {_reason(fx_error)}; torch.export: {_reason(e)}") from e
    return fx.GraphModule(gm, gm.graph, class_name=type(model).__name__)


def _select_output(gm: fx.GraphModule, key: str | None, name: str) -> None:
    """Make the graph return the one tensor of its output that `key` names (`evc.ir.outputs`)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    if isinstance(output.args[0], fx.Node) and key is None:
        return
    tracer = fx.proxy.GraphAppendingTracer(gm.graph)
    with gm.graph.inserting_before(output):
        chosen = one_output(fx.node.map_arg(output.args[0], lambda n: fx.Proxy(n, tracer)), key, name)
    output.args = (chosen.node,)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor, name: str) -> None:
    """Record every node's shape on `example`; a failure names the node it happened at."""
    prop = _ShapeProp(gm)
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints tracebacks
            prop.propagate(example)
    except Exception as e:
        where = f"at node '{prop.node.name}' on an example input of shape {tuple(example.shape)}"
        raise InputError(f"model '{name}' fails {where}: {_reason(e.__cause__ or e)}") from e
