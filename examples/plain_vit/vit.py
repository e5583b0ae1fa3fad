"""A Vision Transformer in plain PyTorch, written without timm.

evc recognises a ViT from its graph, not from timm's classes; this one spells
each part its own way (separate q, k, v projections, an explicit softmax, a
Sequential feed-forward) to keep that honest.

    model = plain_vit_tiny(num_classes=10, img_size=32)
    logits = model(torch.randn(2, 3, 32, 32))   # (2, 10)
"""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = t.shape
        return t.view(batch, tokens, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(self.q(x)), self.split_heads(self.k(x)), self.split_heads(self.v(x))
        weights = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        return self.out((weights @ v).transpose(1, 2).flatten(2))


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), SelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class PlainViT(nn.Module):
    def __init__(self, img_size: int, patch_size: int, dim: int, depth: int, heads: int,
                 mlp_ratio: float, num_classes: int, in_chans: int = 3):
        super().__init__()
        self.embed = PatchEmbed(patch_size, in_chans, dim)
        tokens = (img_size // patch_size) ** 2 + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.layers = nn.ModuleList(Layer(dim, heads, int(dim * mlp_ratio)) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.embed(images)
        x = torch.cat([self.cls.expand(patches.shape[0], -1, -1), patches], dim=1) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.classifier(self.ln(x)[:, 0])


def plain_vit_tiny(num_classes: int = 10, img_size: int = 32, patch_size: int = 4, dim: int = 192,
                   depth: int = 6, heads: int = 3, mlp_ratio: float = 4.0) -> PlainViT:
    """DeiT-Tiny's widths at CIFAR size: 64 patches and a class token."""
    return PlainViT(img_size, patch_size, dim, depth, heads, mlp_ratio, num_classes)
