"""Reference implementations the token passes are tested against, written directly
from the papers' code with dynamic shapes (argsort, scatter_reduce), over timm's modules.

    logits = forward(model, images, before_block=..., after_attention=...)
"""

import math

import torch


def attention(attn, x, size=None):
    """timm's Attention, by hand, with ToMe's proportional attention: (output, probs, keys)."""
    b, n, c = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    probs = logits.softmax(dim=-1)
    return attn.proj((probs @ v).transpose(1, 2).reshape(b, n, c)), probs, k


@torch.no_grad()
def forward(model, images, before_block=None, after_attention=None):
    """A timm ViT's forward, block by block, with hooks where the token passes act.

    before_block(index, x, state) -> x; after_attention(index, x, keys, state) -> x;
    state holds "probs" (the previous block's attention weights) and "attn_size" (the
    token sizes attention adds the log of, for ToMe's proportional attention).
    """
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    state = {}
    for index, block in enumerate(model.blocks):
        if before_block is not None:
            x = before_block(index, x, state)
        out, state["probs"], keys = attention(block.attn, block.norm1(x), state.get("attn_size"))
        x = x + out
        if after_attention is not None:
            x = after_attention(index, x, keys, state)
        x = x + block.mlp(block.norm2(x))
    return model.forward_head(model.norm(x))


def bipartite_soft_matching(metric, r, class_token=False, distill_token=False):
    """ToMe's matching (facebookresearch/ToMe, tome/merge.py), with argsort and scatter_reduce."""
    protected = int(class_token) + int(distill_token)
    r = min(r, (metric.shape[1] - protected) // 2)
    if r <= 0:
        return lambda x, mode="mean": x
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    if distill_token:
        scores[..., :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    return merge


def merge_wavg(merge, x, size=None):
    """ToMe's size-weighted average (tome/merge.py)."""
    size = torch.ones_like(x[..., 0, None]) if size is None else size
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def evit_slim(x, score, prefix, keep, fuse):
    """EViT's token selection (youweiliang/evit): argsort, index, and the fused token."""
    order = score.argsort(dim=-1, descending=True)
    rest = x[:, prefix:]
    batch = torch.arange(x.shape[0])[:, None]
    parts = [x[:, :prefix], rest[batch, order[:, :keep]]]
    if fuse:
        dropped = order[:, keep:]
        weights = score[batch, dropped]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        parts.append((rest[batch, dropped] * weights[..., None]).sum(dim=1, keepdim=True))
    return torch.cat(parts, dim=1)
