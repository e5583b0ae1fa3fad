"""Widths cut for real: Linears sliced by rows or columns, head counts and hidden widths rewritten.

    keep_heads(gm, attn, keep=[0, 2], where="block 3")      # q/k/v rows, projection columns, counts
    keep_hidden(gm, mlp, keep=kept_units, where="block 3")   # input rows, fc2 columns, per-unit extras
    skip_sublayer(gm, residual="add_7")                      # the residual path stays
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import fx, nn

from evc.errors import InputError
from evc.ir.structure import Attention, Mlp
from evc.ir.view import CATS, node_shape, size_value, widths

_RESHAPES = ("reshape", "view")


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    return copy.deepcopy(gm)


def rewritten(program, edits: list[Callable[[fx.GraphModule], None]]):
    """`program` with `edits` applied to a copy of its graph; `program` itself when there are none,
    so a pass with nothing to remove leaves the model bit-identical."""
    if not edits:
        return program
    graph = copy_graph(program.graph)
    for edit in edits:
        edit(graph)
    return program.rebuilt(graph)


def set_submodule(gm: fx.GraphModule, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


def keep_rows(layer: nn.Module, rows: Sequence[int]) -> nn.Module:
    """A Linear (or 1 x 1 Conv2d) with only the given output features of `layer`."""
    return _sliced(layer, 0, rows)


def keep_cols(layer: nn.Module, cols: Sequence[int]) -> nn.Module:
    """A Linear (or 1 x 1 Conv2d) with only the given input features of `layer`."""
    return _sliced(layer, 1, cols)


def _sliced(layer: nn.Module, axis: int, index: Sequence[int]) -> nn.Module:
    """`layer` keeping `index` along its weight's axis 0 (outputs: the bias goes with them) or 1 (inputs)."""
    index = torch.as_tensor(np.asarray(index), dtype=torch.long)
    smaller = copy.deepcopy(layer)
    with torch.no_grad():
        smaller.weight = nn.Parameter(layer.weight.detach().index_select(axis, index).clone())
        if layer.bias is not None and axis == 0:
            smaller.bias = nn.Parameter(layer.bias.detach()[index].clone())
    names = ("out_channels", "in_channels") if isinstance(layer, nn.Conv2d) else ("out_features", "in_features")
    setattr(smaller, names[axis], len(index))
    return smaller


def _nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


def _shape_args(node: fx.Node) -> list:
    """The sizes a reshape or view is given: `x.view(B, N, 3, -1)` or `x.reshape((B, N, 3, -1))`."""
    sizes = node.args[1:]
    return list(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else list(sizes)


def _set_shape_args(node: fx.Node, sizes: list) -> None:
    node.args = (node.args[0], *sizes)


def _head_axis(shape: tuple[int, ...], heads: int, head_dim: int) -> int | None:
    """The axis of size `heads` followed by one of size `head_dim`."""
    return next((i for i in range(1, len(shape) - 1) if shape[i] == heads and shape[i + 1] == head_dim), None)


def _split_of(gm: fx.GraphModule, attn: Attention, linear: str, where: str) -> fx.Node:
    """The head-count reshape that the output of the q/k/v Linear `linear` reaches."""
    counts = set(attn.head_count_nodes)
    start = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == linear)
    frontier = [start]
    for _ in range(4):
        frontier = [u for n in frontier for u in n.users]
        found = [n for n in frontier if n.name in counts]
        if found:
            return found[0]
    raise InputError(f"{where}: cannot find where the output of node '{start.name}' is split into heads")


def head_rows(gm: fx.GraphModule, attn: Attention, linear: str, where: str) -> np.ndarray:
    """Output rows of a q/k/v Linear by head: an array (heads, rows per head), from the split's shape.
    A Linear chunked into q, k and v first (`to_qkv(x).chunk(3, dim=-1)`) is split chunk by chunk.
    In cascaded attention, the rows of another head's projection are -1."""
    if attn.heads_out:  # cascaded: each head has a projection of its own
        rows = widths(gm.get_submodule(linear))[1]
        grid = np.full((attn.num_heads, rows), -1)
        grid[list(attn.qkv).index(linear)] = np.arange(rows)
        return grid
    split = _split_of(gm, attn, linear, where)
    out = widths(gm.get_submodule(linear))[1]
    chunks = _chunks(split, linear)
    shape = node_shape(split)
    # The shortest trailing axes holding the Linear's features with a head axis among them: a batch
    # or token axis of 1 is not one, a head axis of 1 (a stage with one head) is. A 1 x 1 conv's
    # features come first, before the tokens: (B, heads, head_dim, N) (EfficientFormerV2).
    spans = [(i, len(shape)) for i in reversed(range(len(shape)))] + [(1, j) for j in range(2, len(shape))]
    found = (_heads_in(shape[i:j], attn) for i, j in spans if int(np.prod(shape[i:j])) * chunks == out)
    dims, axis = next((f for f in found if f[1] is not None), (None, None))
    if axis is None:
        raise InputError(f"{where}: node '{split.name}' splits '{linear}' as {shape}, with no axis of "
                         f"{attn.num_heads} heads of {attn.head_dim}")
    grid = np.arange(out).reshape(chunks, *dims)
    return np.moveaxis(grid, axis, 0).reshape(attn.num_heads, -1)


def _heads_in(dims: tuple[int, ...], attn: Attention) -> tuple[tuple[int, ...], int | None]:
    """`dims` and the axis of its heads, counted in (chunks, *dims): heads followed by head_dim, or
    heads first with each head's q | k | v after (LeViT); None where it has none."""
    axis = _head_axis((0, *dims), attn.num_heads, attn.head_dim)
    if axis is None and dims and dims[0] == attn.num_heads:
        axis = 1
    return dims, axis


def _chunks(split: fx.Node, linear: str) -> int:
    """How many equal chunks of its last axis the output of `linear` is cut into before `split`."""
    node = split.args[0]
    while isinstance(node, fx.Node) and not (node.op == "call_module" and node.target == linear):
        is_chunk = (node.op == "call_method" and node.target == "chunk") or node.target is torch.chunk
        if is_chunk:
            dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
            if dim in (-1, len(node_shape(node.args[0]) or ()) - 1):
                return node.kwargs.get("chunks", node.args[1])
        node = node.args[0] if node.args else None
    return 1


def _check_head_major(gm: fx.GraphModule, attn: Attention, where: str) -> None:
    """The output projection must read heads one after another: (..., heads, head_dim) flattened."""
    proj = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == attn.proj)
    node = proj.args[0]
    for _ in range(6):
        shape = node_shape(node) or ()
        if any(shape[i:i + 2] == (attn.num_heads, attn.head_dim) for i in range(1, len(shape) - 1)):
            return
        tensors = [a for a in node.all_input_nodes if node_shape(a) is not None]
        if not tensors:
            break
        node = tensors[0]
    raise InputError(f"{where}: cannot tell that node '{proj.name}' reads the heads one after another")


def keep_heads(gm: fx.GraphModule, attn: Attention, keep: Sequence[int], where: str) -> None:
    """Keep only heads `keep` of `attn`: q/k/v rows, output projection columns, head counts."""
    keep = sorted(keep)
    if not keep:
        raise ValueError("at least one head must stay")
    if attn.heads_out:
        _keep_cascaded(gm, attn, keep)
    else:
        _check_head_major(gm, attn, where)
        for linear in attn.qkv:
            rows = np.sort(head_rows(gm, attn, linear, where)[keep].ravel())
            out = widths(gm.get_submodule(linear))[1]
            for module in _per_channel_after(gm, linear):  # BatchNorm, EfficientFormerV2's v_local
                set_submodule(gm, module, _per_unit(gm.get_submodule(module), rows, out))
            set_submodule(gm, linear, keep_rows(gm.get_submodule(linear), rows))
    cols = (np.asarray(keep)[:, None] * attn.head_dim + np.arange(attn.head_dim)).ravel()
    set_submodule(gm, attn.proj, keep_cols(gm.get_submodule(attn.proj), cols))
    for mixer in attn.mixers:  # a head mixed into the others goes from both sides of the mixing
        set_submodule(gm, mixer, keep_rows(keep_cols(gm.get_submodule(mixer), keep), keep))
    for bias in attn.biases:
        _keep_along(gm, bias, -3, keep)
    nodes = _nodes(gm)
    for name in attn.head_count_nodes:
        _rewrite_head_count(nodes[name], attn, len(keep), where)


def _keep_cascaded(gm: fx.GraphModule, attn: Attention, keep: list[int]) -> None:
    """Drop the other heads of cascaded group attention whole: each head's output leaves the concat
    for the projection, and the next head reads its own input slice without it."""
    nodes = _nodes(gm)
    outs = [nodes[name] for name in attn.heads_out]
    cat = next(u for u in outs[0].users if u.target in CATS)
    for head, out in enumerate(outs):
        if head in keep:
            continue
        for user in [u for u in out.users if u is not cat]:  # `out + x_next`: the next head's input
            user.replace_all_uses_with(next(a for a in user.args[:2] if a is not out))
    cat.args = ([out for head, out in enumerate(outs) if head in keep], *cat.args[1:])
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()


def _per_channel_after(gm: fx.GraphModule, linear: str) -> list[str]:
    """Modules that treat each output feature of `linear` on its own, reading it directly, through
    each other, or through a flatten or reshape: BatchNorm (LeViT's `bn(linear(x).flatten(0, 1))`,
    a conv's ConvNorm) and depthwise convs (EfficientFormerV2's local v)."""
    out = widths(gm.get_submodule(linear))[1]
    frontier = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == linear]
    found = []
    for _ in range(4):
        frontier = [u for n in frontier for u in n.users]
        for node in frontier:
            if node.op == "call_module" and _per_channel(gm.get_submodule(node.target), out):
                found.append(node.target)
        frontier = [n for n in frontier if n.target in found or (
            n.op == "call_method" and n.target in ("flatten", "reshape", "view"))]
    return list(dict.fromkeys(found))


def _keep_along(gm: fx.GraphModule, target: str, axis: int, keep: Sequence[int]) -> None:
    """Keep entries `keep` of the buffer or parameter `target` along `axis`."""
    owner, _, leaf = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    tensor = getattr(module, leaf)
    kept = tensor.detach().index_select(axis % tensor.ndim, torch.as_tensor(list(keep))).clone()
    if isinstance(tensor, nn.Parameter):
        setattr(module, leaf, nn.Parameter(kept, requires_grad=tensor.requires_grad))
    else:
        module.register_buffer(leaf, kept)


def _rewrite_head_count(node: fx.Node, attn: Attention, heads: int, where: str) -> None:
    if not (node.op == "call_method" and node.target in _RESHAPES) and node.target is not torch.reshape:
        raise InputError(f"{where}: node '{node.name}' ({node.target}) changes shape by the head count in a way "
                         "evc cannot rewrite; expected reshape or view")
    # A size may be a width the graph reads from a tensor (`c` of `b, n, c = x.shape`):
    # it is compared by its recorded value and replaced by the new number.
    shape, sizes = node_shape(node), _shape_args(node)
    axis = _head_axis(shape, attn.num_heads, attn.head_dim)
    # Logits viewed by window, (B, windows, heads, N, N) (Swin's shift mask), carry the heads
    # before the two token axes.
    logits = len(shape) >= 4 and shape[-1] == shape[-2] and size_value(sizes[-3]) == attn.num_heads == shape[-3]
    if axis is not None and size_value(sizes[axis]) == attn.num_heads:
        sizes[axis] = heads
    elif shape[-1] == attn.num_heads * attn.head_dim and size_value(sizes[-1]) == shape[-1]:
        sizes[-1] = heads * attn.head_dim
    elif logits:
        sizes[-3] = heads
    elif len(shape) >= 4 and size_value(sizes[-2]) == attn.num_heads == shape[-2]:
        sizes[-2] = heads  # (B, N, heads, q | k | v of the head): LeViT's split
    elif len(shape) == 4 and size_value(sizes[1]) == attn.num_heads == shape[1]:
        sizes[1] = heads  # (B, heads, head_dim, N) from a 1 x 1 conv (EfficientFormerV2)
    elif len(shape) == 4 and size_value(sizes[1]) == attn.num_heads * attn.head_dim == shape[1]:
        sizes[1] = heads * attn.head_dim  # heads back on the grid, (B, heads x head_dim, H, W)
    _set_shape_args(node, sizes)


def hidden_rows(mlp: Mlp) -> dict[str, np.ndarray]:
    """The rows of each input projection of `mlp` by hidden unit: {module name: (chunks, hidden)}.
    A packed gated MLP's fc1 gives value and gate one after the other, unit by unit in each."""
    rows = {mlp.fc1: np.arange(mlp.packed * mlp.hidden).reshape(mlp.packed, mlp.hidden)}
    return rows | ({mlp.gate: np.arange(mlp.hidden)[None]} if mlp.gate else {})


def keep_hidden(gm: fx.GraphModule, mlp: Mlp, keep: Sequence[int], where: str) -> None:
    """Keep only hidden units `keep` of `mlp`: its input projections' rows, fc2's input columns, and
    everything per unit between them: a scale (LayerScale), a norm's weights (its statistics are
    then over the kept units), a depthwise convolution's channels (PVT-v2), BatchNorm's weights and
    running statistics (sliced, never recomputed), and the width in reshapes to the patch grid."""
    keep = np.sort(np.asarray(keep))
    projections = hidden_rows(mlp)
    nodes = list(gm.graph.nodes)
    first = min(i for i, n in enumerate(nodes) if n.op == "call_module" and n.target in projections)
    fc2 = next(i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == mlp.fc2)
    for node in nodes[first + 1 : fc2]:
        if node.op == "get_attr" and (node_shape(node) or (0,))[-1] == mlp.hidden:
            _keep_along(gm, node.target, -1, keep)  # a scale per unit (LayerScale): its units go with them
        if (node.op == "call_method" and node.target in _RESHAPES) or node.target is torch.reshape:
            _rewrite_width(node, mlp.hidden, len(keep))
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if module is None or node.target in projections or not any(p.shape[0] == mlp.hidden
                                                                      for p in module.parameters()):
            continue
        smaller = _per_unit(module, keep, mlp.hidden)
        if smaller is None:
            raise InputError(f"{where}: node '{node.name}' has weights over the MLP's hidden units; "
                             "ffn_prune cannot remove units under it")
        set_submodule(gm, node.target, smaller)
    for name, rows in projections.items():
        set_submodule(gm, name, keep_rows(gm.get_submodule(name), rows[:, keep].ravel()))
    set_submodule(gm, mlp.fc2, keep_cols(gm.get_submodule(mlp.fc2), keep))


def _rewrite_width(node: fx.Node, hidden: int, kept: int) -> None:
    """A reshape that lays the hidden units out on the grid, `x.view(B, C, H, W)`: C becomes `kept`."""
    shape, sizes = node_shape(node), _shape_args(node)
    axes = [i for i, size in enumerate(sizes) if size_value(size) == hidden and shape[i] == hidden]
    for i in axes:
        sizes[i] = kept
    _set_shape_args(node, sizes)


def _per_unit(module: nn.Module, keep: np.ndarray, hidden: int) -> nn.Module | None:
    """`module` on the kept units alone, for a module that treats each unit on its own; else None."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return _norm_over(module, keep)
    if not _per_channel(module, hidden):
        return None
    index = torch.as_tensor(keep)
    smaller = copy.deepcopy(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        smaller.num_features = len(keep)
    else:
        smaller.in_channels = smaller.out_channels = smaller.groups = len(keep)
    for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if tensor.ndim and tensor.shape[0] == hidden:
            kept = tensor.detach()[index].clone()
            if isinstance(tensor, nn.Parameter):
                setattr(smaller, name, nn.Parameter(kept))
            else:
                smaller.register_buffer(name, kept)
    return smaller


def _per_channel(module: nn.Module, width: int) -> bool:
    """A BatchNorm over `width` channels, or a depthwise Conv2d on them: each channel on its own."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features == width
    return isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels == width


def _norm_over(norm: nn.LayerNorm | nn.RMSNorm, keep: np.ndarray) -> nn.Module:
    smaller = copy.deepcopy(norm)
    smaller.normalized_shape = (len(keep),)
    index = torch.as_tensor(keep)
    for name, param in norm.named_parameters():
        setattr(smaller, name, nn.Parameter(param.detach()[index].clone()))
    return smaller


def skip_sublayer(gm: fx.GraphModule, residual: str, skip: str | None = None) -> None:
    """Remove the sublayer that the residual add `residual` closes; the residual path stays. `skip` names
    the add's operand that is the path (a scaled stream written branch-first); else it is the earlier one."""
    nodes = _nodes(gm)
    add = nodes[residual]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    skip = nodes[skip] if skip else min((a for a in add.args[:2] if isinstance(a, fx.Node)), key=order.__getitem__)
    add.replace_all_uses_with(skip)
    gm.graph.erase_node(add)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
