"""nn.MultiheadAttention, spelled in ops torch.fx records, with the same weights.

torch.fx keeps nn.MultiheadAttention as one opaque call, so its heads and
projections would be invisible to recognition and surgery. Before tracing,
each one is replaced by `Attention`, the same computation written as timm
writes attention: a fused q/k/v Linear (self-attention) or a q Linear and a
fused k/v Linear (cross-attention: a query attending to other tokens, as an
attention-pool head's latent query does), a reshape by the head count,
softmax, and the output projection.

    model = traceable_attention(torchvision.models.vit_b_16())   # a copy; the user's model is untouched
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from evc.errors import InputError


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A Linear holding `weight` and `bias` themselves (views of in_proj's: nothing is copied)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach())
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach())
    return linear


class Attention(nn.Module):
    """nn.MultiheadAttention with `mha`'s weights, in ops torch.fx sees: `qkv` where the call is
    self-attention, `q` and `kv` (views of the same in_proj) where the key is other tokens."""

    def __init__(self, mha: nn.MultiheadAttention, name: str):
        super().__init__()
        where = f"nn.MultiheadAttention '{name}'"
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise InputError(f"{where}: only attention without bias_k/add_zero_attn can be traced into; "
                             "kdim, vdim or add_bias_kv are set")
        self.name, self.batch_first = name, mha.batch_first
        self.num_heads, self.head_dim = mha.num_heads, mha.head_dim
        weight, bias, width = mha.in_proj_weight, mha.in_proj_bias, mha.embed_dim
        self.qkv = _linear(weight, bias)
        self.q = _linear(weight[:width], None if bias is None else bias[:width])
        self.kv = _linear(weight[width:], None if bias is None else bias[width:])
        self.proj = mha.out_proj

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        # Identity of fx's proxies: whether the model's code passes one tensor three times.
        if value is not key:
            raise InputError(f"nn.MultiheadAttention '{self.name}' is called with a value that is not its key; "
                             "evc traces self-attention and cross-attention to one set of tokens only")
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise InputError(f"nn.MultiheadAttention '{self.name}' is called with a mask; "
                             "evc recognises unmasked attention only")
        x = query if self.batch_first else query.transpose(0, 1)
        b, n = x.shape[0], x.shape[1]
        if key is query:
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            tokens = key if self.batch_first else key.transpose(0, 1)
            q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            k, v = self.kv(tokens).reshape(b, tokens.shape[1], 2, self.num_heads, self.head_dim
                                           ).permute(2, 0, 3, 1, 4).unbind(0)
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
        setattr(owner, leaf, Attention(model.get_submodule(name), name))
    return model
