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
    # Module names of square Linears over the head axis that mix heads (CaiT's talking heads,
    # before and after the softmax): a removed head leaves both their rows and their columns.
    mixers: tuple[str, ...] = ()
    # get_attr targets of constants (..., heads, N, N) added to the logits (BEiT's relative
    # position bias, folded by evc.ir.constants): sliced on their head axis with the heads.
    biases: tuple[str, ...] = ()
    # Node names of each head's output in cascaded group attention (EfficientViT-M), where every head
    # has its own q/k/v (`qkv` holds one per head) and feeds the next: a removed head is dropped whole.
    heads_out: tuple[str, ...] = ()


@dataclass(frozen=True)
class Mlp:
    fc1: str  # module name
    fc2: str  # module name
    hidden: int
    act_node: str  # node name of the hidden units' values: the activation, or a gated MLP's product
    residual: str  # node name of the residual add `x + mlp(x)` that closes the sublayer
    gate: str | None = None  # module name of a gated MLP's second input projection (SwiGLU's fc1_g)
    packed: int = 1  # fc1 gives `packed` chunks of `hidden` features (2: value and gate in one Linear)
    axis: int = -1  # the hidden units' axis in act_node's value: 1 for 1 x 1 convs on (B, C, H, W) maps


@dataclass(frozen=True)
class Local:
    """A residual branch with neither attention nor an MLP: depthwise convolutions, pooling or a
    re-parameterisable conv mixing neighbouring tokens (EfficientViT's dw, FastViT's RepMixer).
    It has no heads or hidden units to remove; it stays with its block."""

    residual: str  # node name of the residual add that closes it


@dataclass(frozen=True)
class Block:
    index: int
    attn: Attention | None  # None once a pass has removed the attention sublayer
    mlp: Mlp | None
    tokens: int  # tokens entering the block, class tokens included
    nodes: tuple[str, ...]  # node names, in graph order; per-block MACs sum over these
    class_attention: bool = False  # the class token alone attends to the tokens (CaiT's last blocks)
    # Node names of constants the block reads with an axis of its tokens (a relative position
    # bias, a rotary embedding): they fix the token count, so token passes leave it.
    fixed_tokens: tuple[str, ...] = ()
    stage: int = 0  # the stage of a hierarchical model (PVT, Swin) the block belongs to
    local: tuple[Local, ...] = ()  # its residual branches that mix tokens by convolution or pooling


@dataclass(frozen=True)
class Stage:
    """Blocks of one width in a hierarchical model, between two downsamplings."""

    index: int
    dim: int
    tokens: int  # tokens entering its first block
    blocks: tuple[int, int]  # indices of its blocks in Structure.blocks: [first, last + 1)


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
    stages: tuple[Stage, ...] = ()  # a hierarchical model's stages; () for a plain ViT, one stage of embed_dim

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def to_dict(self) -> dict:
        return {**asdict(self), "depth": self.depth}

    def _describe(self, block: Block) -> list[str]:
        stage = next((s for s in self.stages if s.blocks[0] == block.index), None)
        heading = [f"stage {stage.index}: width {stage.dim}, {stage.tokens} tokens"] if stage else []
        return heading + [_describe_block(block)]

    def fixed_token_count(self) -> str | None:
        """Why token passes cannot change this model's token count, or None where they can."""
        if self.stages:
            return (f"the model has {len(self.stages)} stages of widths "
                    f"{', '.join(str(s.dim) for s in self.stages)}: token passes change token counts only in a "
                    "plain ViT, whose tokens keep one width from the patch embedding to the head")
        for block in self.blocks:
            if block.fixed_tokens:
                return (f"block {block.index} reads node '{block.fixed_tokens[0]}', a constant with one value per "
                        "token position (a relative position bias or a rotary embedding), which fixes its tokens")
            if block.class_attention:
                return (f"block {block.index} is a class-attention block (CaiT), and evc changes token counts only "
                        "in models whose blocks all attend over the token stream")
        return None

    def describe(self) -> str:
        """A few lines for people: the stem, one line a block, the head."""
        gh, gw = self.grid
        prefix = ", ".join(self.prefix_tokens) or "none"
        lines = [
            f"embed {self.embed_dim}, patches {self.patch_size[0]}x{self.patch_size[1]} "
            f"on a {gh}x{gw} grid, prefix tokens: {prefix}, pos embed: {self.pos_embed}",
            *(line for b in self.blocks for line in self._describe(b)),
            f"norm {self.norm}, pool {self.pool}, "
            + (f"head {', '.join(self.head)} ({self.num_classes} classes)" if self.head
               else f"no head: features, {self.embed_dim} wide"),
        ]
        return "\n".join(lines)


def _describe_block(block: Block) -> str:
    attn = block.attn and _describe_attention(block.attn, block.class_attention)
    mlp = block.mlp and f"{'gated ' if block.mlp.gate or block.mlp.packed > 1 else ''}mlp {block.mlp.hidden}"
    fixed = f", positions fixed by {', '.join(block.fixed_tokens)}" if block.fixed_tokens else ""
    local = f", {len(block.local)} conv mixer{'s' if len(block.local) > 1 else ''}" if block.local else ""
    return f"  block {block.index}: {attn or 'no attn'}, {mlp or 'no mlp'}{local}, {block.tokens} tokens{fixed}"


def _describe_attention(attn: Attention, class_attention: bool) -> str:
    extras = [f"heads mixed by {', '.join(attn.mixers)}"] if attn.mixers else []
    extras += [f"logit bias {', '.join(attn.biases)}"] if attn.biases else []
    kind = "class attn" if class_attention else "attn"
    return f"{kind} {attn.num_heads}x{attn.head_dim}" + (f" ({'; '.join(extras)})" if extras else "")
