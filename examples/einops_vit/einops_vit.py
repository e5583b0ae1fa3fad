"""A ViT in vit-pytorch's style (lucidrains): einops cuts the patches and splits the heads.

    from einops_vit import EinopsViT
    model = EinopsViT(image_size=224, dim=192, depth=12, heads=3, dim_head=64, patch=16, num_classes=1000)

No Conv2d: the patches are embedded by a Linear after `Rearrange`, and q, k
and v come from one Linear chunked in three. torch.fx cannot trace einops (it
dispatches on the tensor's type), so evc captures it with torch.export; the
tests and benchmarks/families.py build it to show that evc needs no change to
code written this way.
"""

from __future__ import annotations

import torch
from torch import nn


class EinopsAttention(nn.Module):
    """vit-pytorch's Attention: one to_qkv Linear chunked in three, heads split by einops."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, heads * dim_head * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(0.0))

    def forward(self, x):
        from einops import rearrange

        qkv = self.to_qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in qkv)
        attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)
        return self.to_out(rearrange(torch.matmul(attn, v), "b h n d -> b n (h d)"))


class EinopsViT(nn.Module):
    """vit-pytorch's ViT: patches cut by einops' Rearrange and embedded by a Linear, no Conv2d."""

    def __init__(self, image_size: int = 32, dim: int = 64, depth: int = 4, heads: int = 4, dim_head: int = 16,
                 patch: int = 8, num_classes: int = 10):
        from einops.layers.torch import Rearrange

        super().__init__()
        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch),
            nn.LayerNorm(patch * patch * 3), nn.Linear(patch * patch * 3, dim), nn.LayerNorm(dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layers = nn.ModuleList(nn.ModuleList([
            EinopsAttention(dim, heads, dim_head),
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))])
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.mlp_head = nn.Linear(dim, num_classes)

    def forward(self, img):
        from einops import repeat

        x = self.to_patch_embedding(img)
        b, n, _ = x.shape
        x = torch.cat((repeat(self.cls_token, "1 1 d -> b 1 d", b=b), x), dim=1)
        x += self.pos_embedding[:, :(n + 1)]
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.mlp_head(self.norm(x)[:, 0])
