"""ViTs written the ways users bring them, small enough to build and prune in seconds.

    model = shape_vit()        # plain PyTorch reading its widths from x.shape, as older timm did
    model = torchvision_vit()  # torchvision's VisionTransformer: nn.MultiheadAttention inside
    model = einops_vit()       # vit-pytorch's style (examples/einops_vit): einops, no Conv2d
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

SIZE = 32


class ShapeAttention(nn.Module):
    """timm 0.4's Attention: the width comes from the input, `B, N, C = x.shape`."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class ShapeBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), ShapeAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ShapeViT(nn.Module):
    def __init__(self, dim: int = 64, depth: int = 3, num_heads: int = 4, patch: int = 8, num_classes: int = 10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (SIZE // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(ShapeBlock(dim, num_heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        B, _, C = x.shape
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def shape_vit(**kwargs) -> ShapeViT:
    return ShapeViT(**kwargs)


def torchvision_vit(num_layers: int = 4, num_heads: int = 4, hidden_dim: int = 64) -> nn.Module:
    """torchvision's VisionTransformer at 32x32: nn.MultiheadAttention in every block."""
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=SIZE, patch_size=8, num_layers=num_layers, num_heads=num_heads,
                              hidden_dim=hidden_dim, mlp_dim=4 * hidden_dim, num_classes=10)
    # torchvision starts the classifier at zero: every gradient, and so every Taylor score, would be 0.
    nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def hf_config(kind: str = "vit", layers: int = 4, hidden: int = 64, heads: int = 4, attention: str = "eager"):
    """A small Hugging Face ViT or DeiT config at 32x32, 10 labels."""
    from transformers import DeiTConfig, ViTConfig

    config = (DeiTConfig if kind == "deit" else ViTConfig)(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden,
        image_size=SIZE, patch_size=8, num_labels=10)
    config._attn_implementation = attention
    return config


def hf_vit(attention: str = "eager") -> nn.Module:
    """transformers' ViTForImageClassification: returns a ModelOutput, attention by `attention`."""
    from transformers import ViTForImageClassification

    return ViTForImageClassification(hf_config(attention=attention))


def hf_deit_distilled() -> nn.Module:
    """transformers' DeiT with class and distillation tokens, its two heads averaged."""
    from transformers import DeiTForImageClassificationWithTeacher

    return DeiTForImageClassificationWithTeacher(hf_config("deit"))


def einops_vit(**kwargs) -> nn.Module:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "einops_vit"))
    from einops_vit import EinopsViT

    return EinopsViT(image_size=SIZE, **kwargs)
