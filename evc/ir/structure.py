"""The transformer structure recognised in a traced model.

Names here are of two kinds: *module names* (`blocks.0.attn.qkv`, what
`gm.get_submodule` takes) and *node names* (`blocks_0_attn_qkv`, `reshape_1`,
what `gm.graph` calls its nodes). Each field says which it holds.

    structure = recognise(gm)
    structure.blocks[3].attn.num_heads   # 3
    structure.blocks[3].mlp.fc1          # 'blocks.3.mlp.fc1'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Attention:
    qkv: tuple[str, ...]  # module names: one fused Linear (out = 3 * heads * head_dim) or q, k, v
    proj: str  # module name of the output projection Linear
    num_heads: int
    head_dim: int
    # Node names of the reshapes/views whose arguments carry the head count, either
    # as `num_heads` (a split: the axis of that size is followed by one of `head_dim`)
    # or as `num_heads * head_dim` (a merge). head_prune rewrites these.
    head_count_nodes: tuple[str, ...]
    score_node: str  # node name of the softmax or scaled_dot_product_attention
    context_node: str  # node name of the weights applied to v: (B, heads, N, head_dim)
    residual: str  # node name of the residual add `x + attn(x)` that closes the sublayer


@dataclass(frozen=True)
class Mlp:
    fc1: str  # module name
    fc2: str  # module name
    hidden: int
    act_node: str  # node name
    residual: str  # node name of the residual add `x + mlp(x)` that closes the sublayer


@dataclass(frozen=True)
class Block:
    index: int
    attn: Attention | None  # None once a pass has removed the attention sublayer
    mlp: Mlp | None
    tokens: int  # tokens entering the block, class tokens included
    nodes: tuple[str, ...]  # node names, in graph order; per-block MACs sum over these


@dataclass(frozen=True)
class Structure:
    embed_dim: int
    patch_embed: str  # module name of the patch-embedding Conv2d, or Linear on flattened patches
    patch_size: tuple[int, int]
    grid: tuple[int, int]
    prefix_tokens: tuple[str, ...]  # get_attr targets of class/distillation tokens, in order
    pos_embed: str | None  # get_attr target
    blocks: tuple[Block, ...]
    norm: str | None  # module name of the final norm (before or after pooling)
    pool: str  # "token" (class token) or "avg" (mean over tokens)
    head: tuple[str, ...]  # module names of the classifier Linear(s): two for distilled DeiT; none for features
    num_classes: int  # 0 for a feature extractor

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def to_dict(self) -> dict:
        return {**asdict(self), "depth": self.depth}

    def describe(self) -> str:
        """A few lines for people: the stem, one line a block, the head."""
        gh, gw = self.grid
        prefix = ", ".join(self.prefix_tokens) or "none"
        lines = [
            f"embed {self.embed_dim}, patches {self.patch_size[0]}x{self.patch_size[1]} "
            f"on a {gh}x{gw} grid, prefix tokens: {prefix}, pos embed: {self.pos_embed}",
            *(_describe_block(b) for b in self.blocks),
            f"norm {self.norm}, pool {self.pool}, "
            + (f"head {', '.join(self.head)} ({self.num_classes} classes)" if self.head
               else f"no head: features, {self.embed_dim} wide"),
        ]
        return "\n".join(lines)


def _describe_block(block: Block) -> str:
    attn = block.attn and f"attn {block.attn.num_heads}x{block.attn.head_dim}"
    mlp = block.mlp and f"mlp {block.mlp.hidden}"
    return f"  block {block.index}: {attn or 'no attn'}, {mlp or 'no mlp'}, {block.tokens} tokens"
