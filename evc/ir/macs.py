"""Count parameters and multiply-accumulates, per node and per block.

    summary = summarize(gm, recognise(gm), torch.randn(1, 3, 224, 224))
    summary.macs                 # 1_253_683_200 for deit_tiny_patch16_224
    summary.blocks[0].macs       # one block's share; stem + blocks + head == total
    summary.blocks[0].parts.mlp  # its MLP's share; attention + mlp + tokens == the block's

MACs come from torch.utils.flop_counter (MACs = FLOPs / 2). Its registry has
no formula for the CPU kernel of scaled_dot_product_attention, which would
count attention as free; `SDPA_FORMULAS` adds one with flop_counter's own
sdpa_flop_count. They are the MACs spent per image: what a node computes from
weights and sizes alone (Swin v2's position-bias MLP on its fixed coordinates)
costs nothing, as the exported model holds its result as a constant.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from evc.ir.structure import Block, Structure


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


SDPA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


class _NodeMacs(fx.Interpreter):
    """Runs a graph inside one FlopCounterMode and books each node the FLOPs it added."""

    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode):
        super().__init__(gm)
        self.counter = counter
        self.macs: dict[str, int] = {}
        self.per_image = _on_the_image(gm.graph)

    def get_attr(self, target, args, kwargs):
        # A parameter viewed under no_grad (timm's attention pool expands its latent query) would be a
        # view requiring grad without a grad_fn, which the counter's module tracker cannot hook.
        value = super().get_attr(target, args, kwargs)
        return value.detach() if isinstance(value, torch.Tensor) else value

    def run_node(self, n: fx.Node):
        before = self.counter.get_total_flops()
        result = super().run_node(n)
        self.macs[n.name] = (self.counter.get_total_flops() - before) // 2 if n in self.per_image else 0
        return result


def _on_the_image(graph: fx.Graph) -> set[fx.Node]:
    """The nodes that read the image's values through their inputs. Its shape is fixed in an artifact, so
    what is computed from sizes alone (EdgeNeXt's Fourier position encoding) is a constant there too."""
    reached: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in reached for a in node.all_input_nodes) and not _reads_size(node):
            reached.add(node)
    return reached


def _reads_size(node: fx.Node) -> bool:
    """`x.size(i)` or `x.shape`."""
    return (node.op == "call_method" and node.target == "size") or (
        node.target is getattr and node.args[1] == "shape")


def node_macs(gm: fx.GraphModule, example: torch.Tensor) -> dict[str, int]:
    """MACs of every node of `gm` on `example`, keyed by node name."""
    counter = FlopCounterMode(display=False, custom_mapping=SDPA_FORMULAS)
    interpreter = _NodeMacs(gm, counter)
    with torch.no_grad(), counter:
        interpreter.run(example)
    return interpreter.macs


def _parameters(gm: fx.GraphModule, name: str) -> Iterator[nn.Parameter]:
    """The parameters behind a module name (all of its own and its children's) or a parameter name."""
    owner, _, attr = name.rpartition(".")
    value = getattr(gm.get_submodule(owner), attr)
    if isinstance(value, nn.Module):
        yield from value.parameters()
    elif isinstance(value, nn.Parameter):
        yield value


def params_of(gm: fx.GraphModule, names: Iterable[str]) -> int:
    """Parameters of the named modules or parameters, each tensor counted once."""
    unique = {id(p): p for name in names for p in _parameters(gm, name)}
    return sum(p.numel() for p in unique.values())


def node_params(gm: fx.GraphModule) -> dict[str, int]:
    """Parameters each call_module or get_attr node brings in; a shared tensor counts at its first use."""
    seen: set[int] = set()
    counts = {}
    for node in gm.graph.nodes:
        named = node.op in ("call_module", "get_attr")
        fresh = [p for p in (_parameters(gm, node.target) if named else ()) if id(p) not in seen]
        seen.update(id(p) for p in fresh)
        counts[node.name] = sum(p.numel() for p in fresh)
    return counts


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int


@dataclass(frozen=True)
class Parts:
    """A block's cost by part: its attention branch (norm to residual add), its MLP branch, and the rest:
    what token passes put between them (ToMe's matching, EViT's gathers), conv mixers."""

    attention: Cost
    mlp: Cost
    tokens: Cost


@dataclass(frozen=True)
class BlockCost:
    index: int
    heads: int  # 0 where the attention was removed
    hidden: int  # 0 where the MLP was removed
    tokens: int
    params: int
    macs: int
    parts: Parts | None = None  # the same cost by part


@dataclass(frozen=True)
class Summary:
    stem: Cost  # every node before the first block
    blocks: tuple[BlockCost, ...]
    head: Cost  # every node after the last block
    total: Cost

    @property
    def params(self) -> int:
        return self.total.params

    @property
    def macs(self) -> int:
        return self.total.macs

    def to_dict(self) -> dict:
        return asdict(self)


def _cost(names: Iterable[str], params: dict[str, int], macs: dict[str, int]) -> Cost:
    names = list(names)
    return Cost(sum(params[n] for n in names), sum(macs[n] for n in names))


def _block_cost(gm: fx.GraphModule, block: Block, params: dict[str, int], macs: dict[str, int]) -> BlockCost:
    cost = _cost(block.nodes, params, macs)
    heads = block.attn.num_heads if block.attn else 0
    hidden = block.mlp.hidden if block.mlp else 0
    nodes = {n.name: n for n in gm.graph.nodes}
    inside = set(block.nodes)
    attention = _branch(nodes, inside, block.attn.residual, block.attn.score_node) if block.attn else set()
    mlp = _branch(nodes, inside, block.mlp.residual, block.mlp.act_node) if block.mlp else set()
    rest = [n for n in block.nodes if n not in attention and n not in mlp]
    parts = Parts(_cost(attention, params, macs), _cost(mlp, params, macs), _cost(rest, params, macs))
    return BlockCost(block.index, heads, hidden, block.tokens, cost.params, cost.macs, parts)


def _branch(nodes: dict[str, fx.Node], inside: set[str], residual: str, marker: str) -> set[str]:
    """Node names of the residual branch `x + f(x)` closed by `residual`, the add included: what leads to
    its argument that `marker` (the softmax, the activation) leads to, less what leads to the skip."""
    add = nodes[residual]
    args = add.all_input_nodes
    branch = next((a for a in args if marker in _upstream(a, inside)), None)
    if branch is None:
        return {residual}
    skip = set().union(*(_upstream(a, inside) for a in args if a is not branch))
    return (_upstream(branch, inside) - skip) | {residual}


def _upstream(node: fx.Node, inside: set[str]) -> set[str]:
    """`node` and every node of `inside` it depends on through nodes of `inside`."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n.name in seen or n.name not in inside:
            continue
        seen.add(n.name)
        stack.extend(n.all_input_nodes)
    return seen


def summarize(gm: fx.GraphModule, structure: Structure | None, example: torch.Tensor) -> Summary:
    """Params and MACs of the stem, each block and the head; they add up to the totals.

    Without a structure (a model evc does not recognise) the stem is the whole model.
    """
    params, macs = node_params(gm), node_macs(gm, example)
    names = [n.name for n in gm.graph.nodes]
    blocks = structure.blocks if structure is not None else ()
    in_blocks = {name for b in blocks for name in b.nodes}
    first = next((i for i, name in enumerate(names) if name in in_blocks), len(names))
    outside = [(i, name) for i, name in enumerate(names) if name not in in_blocks]
    return Summary(
        stem=_cost((name for i, name in outside if i < first), params, macs),
        blocks=tuple(_block_cost(gm, b, params, macs) for b in blocks),
        head=_cost((name for i, name in outside if i > first), params, macs),
        total=_cost(names, params, macs),
    )
