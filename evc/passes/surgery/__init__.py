"""Structure surgery: the one set of helpers every structural pass rewrites a model with.

    program = rewritten(program, [
        partial(keep_heads, attn=block.attn, keep=[0, 2], where="block 3"),
        partial(keep_hidden, mlp=block.mlp, keep=kept_units, where="block 3"),
        partial(skip_sublayer, residual=block.mlp.residual),
    ])   # edits a copy of the graph, then recompiles once and re-propagates shapes

Weights are removed for real: Linears are replaced by smaller ones and the
head counts the graph reshapes by are rewritten, so the exported model is
smaller and faster, not just sparser (`evc.passes.surgery.widths`). Token passes put
ops of their own into the graph (`evc.passes.surgery.graph`).
"""

from evc.passes.surgery.graph import (
    add_attention_bias,
    attention_keys,
    attention_probs,
    features,
    inline,
    node_named,
    probs_at,
    reroute,
    sharing_weights,
    spell_out_attention,
)
from evc.passes.surgery.widths import (
    copy_graph,
    head_rows,
    hidden_rows,
    keep_cols,
    keep_heads,
    keep_hidden,
    keep_rows,
    rewritten,
    set_submodule,
    skip_sublayer,
)

__all__ = [
    "add_attention_bias", "attention_keys", "attention_probs", "copy_graph", "features", "head_rows", "hidden_rows",
    "inline", "keep_cols", "keep_heads", "keep_hidden", "keep_rows", "node_named", "probs_at", "reroute", "rewritten",
    "set_submodule", "sharing_weights", "skip_sublayer", "spell_out_attention",
]
