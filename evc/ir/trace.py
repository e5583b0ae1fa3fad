"""Trace a model into an FX GraphModule whose nodes carry their shapes.

    gm = trace(model, torch.randn(1, 3, 224, 224))
    gm.graph                                   # one node per op, module call or parameter
    node.meta["tensor_meta"].shape             # every tensor-valued node has one

Linear, Conv2d and LayerNorm stay whole (`call_module`) even when a model
subclasses them, so recognition and surgery find them by module name. timm
models trace through timm's own lists of modules and functions not to trace
into; any other nn.Module traces with plain torch.fx.
"""

from __future__ import annotations

import sys

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from evc.errors import InputError

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


def _drop_unused_defaults(graph: fx.Graph) -> None:
    """timm's `forward(x, attn_mask=None, ...)`: the program takes the image alone."""
    for node in list(graph.nodes):
        if node.op == "placeholder" and node.args and not node.users:
            graph.erase_node(node)


def _reason(error: Exception) -> str:
    first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return first if len(first) <= 200 else first[:197] + "..."


def trace(model: nn.Module, example: torch.Tensor, name: str | None = None) -> fx.GraphModule:
    """Symbolically trace `model` (put in eval mode) and record every node's shape on `example`."""
    name = name or type(model).__name__
    model.eval()
    leaf_types, autowrap = _timm_no_trace()
    try:
        graph = _Tracer(leaf_types, autowrap).trace(model)
    except Exception as e:  # torch.fx raises many types; all mean "not traceable"
        raise InputError(f"cannot trace model '{name}': {_reason(e)}") from e
    _drop_unused_defaults(graph)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except Exception as e:
        shape = tuple(example.shape)
        raise InputError(f"model '{name}' fails on an example input of shape {shape}: {_reason(e)}") from e
    return gm
