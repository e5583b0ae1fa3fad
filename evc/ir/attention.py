"""nn.MultiheadAttention, spelled in ops torch.fx records, with the same weights.

torch.fx keeps nn.MultiheadAttention as one opaque call, so its heads and
projections would be invisible to recognition and surgery. Before tracing,
each one is replaced by `SelfAttention`, the same computation written as
timm writes attention: a fused q/k/v Linear, a reshape by the head count,
softmax, and the output projection.

    model = traceable_attention(torchvision.models.vit_b_16())   # a copy; the user's model is untouched
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from evc.errors import InputError


class SelfAttention(nn.Module):
    """nn.MultiheadAttention's self-attention, with `mha`'s weights, in ops torch.fx sees."""

    def __init__(self, mha: nn.MultiheadAttention, name: str):
        super().__init__()
        where = f"nn.MultiheadAttention '{name}'"
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise InputError(f"{where}: only self-attention without bias_k/add_zero_attn can be traced into; "
                             "kdim, vdim or add_bias_kv are set")
        self.name, self.batch_first = name, mha.batch_first
        self.num_heads, self.head_dim = mha.num_heads, mha.head_dim
        self.qkv = nn.Linear(mha.embed_dim, 3 * mha.embed_dim, bias=mha.in_proj_bias is not None)
        with torch.no_grad():
            self.qkv.weight.copy_(mha.in_proj_weight)
            if mha.in_proj_bias is not None:
                self.qkv.bias.copy_(mha.in_proj_bias)
        self.proj = mha.out_proj

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        # Identity of fx's proxies: whether the model's code passes one tensor three times.
        if key is not query or value is not query:
            raise InputError(f"nn.MultiheadAttention '{self.name}' is called as cross-attention "
                             "(key or value is not the query); evc recognises self-attention only")
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise InputError(f"nn.MultiheadAttention '{self.name}' is called with a mask; "
                             "evc recognises unmasked self-attention only")
        x = query if self.batch_first else query.transpose(0, 1)
        b, n = x.shape[0], x.shape[1]
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        weights = torch.softmax((q * self.head_dim ** -0.5) @ k.transpose(-2, -1), dim=-1)
        out = self.proj((weights @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))
        out = out if self.batch_first else out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights


def traceable_attention(model: nn.Module) -> nn.Module:
    """`model` itself if it holds no nn.MultiheadAttention, else a copy with each one replaced."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if not names:
        return model
    model = copy.deepcopy(model)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, SelfAttention(model.get_submodule(name), name))
    return model

