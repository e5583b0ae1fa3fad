"""Token operations with static shapes: the math patch_slim and token_merge put into a graph.

Every count is an int fixed when the graph is built, and no op has a shape
that depends on the data: tokens are ranked with topk and moved with gathers
and one-hot matmuls, never with scatter_reduce, nonzero or boolean masks. So
the graph these functions are traced into lowers to ONNX, TFLite and NPUs.

    probs = attention(q, k, v, scale)[1]                  # (B, heads, N, N)
    x = slim(x, class_attention(probs, prefix=1), prefix=1, keep=96, fuse=True)
    x, size = merge(x, size, key_t.mean(1).transpose(1, 2), r=8, cls=True, distill=False)

They are traced by `evc.passes.surgery.inline`, so they use only torch calls on
their tensor arguments: a tensor made from ints alone would become a
constant of the traced function rather than an op of the graph.
"""

from __future__ import annotations

import torch


def attention(q, k, v, scale: float, bias=None):
    """Softmax attention spelled out, returning the weights too: (context, probs)."""
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    probs = logits.softmax(dim=-1)
    return probs @ v, probs


def class_attention(probs, prefix: int):
    """How much the class token attends to each patch, averaged over heads: (B, patches)."""
    return probs[:, :, 0, prefix:].mean(dim=1)


def mean_attention(probs, prefix: int):
    """How much attention each patch receives, averaged over heads and queries: (B, patches)."""
    return probs[:, :, :, prefix:].mean(dim=(1, 2))


def _take(tokens, index, dim: int):
    """tokens[b, index[b, i]] for each b and i: (B, len(index), dim)."""
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, dim))


def slim(x, score, prefix: int, patches: int, keep: int, dim: int, fuse: bool):
    """Keep the `keep` patches of `x` that score highest; the prefix tokens always stay.

    x is (B, prefix + patches, dim) and score (B, patches). With `fuse`, one more
    token, the score-weighted mean of the dropped patches, follows the kept ones (EViT).
    """
    parts = [x[:, :prefix]] if prefix else []
    if not (keep or fuse):
        return parts[0]
    ranked = torch.topk(score, patches if fuse else keep, dim=-1)
    rest = x[:, prefix:]
    if keep:
        parts.append(_take(rest, ranked.indices[:, :keep], dim))
    if fuse:
        weights = ranked.values[:, keep:]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        parts.append(weights.unsqueeze(1) @ _take(rest, ranked.indices[:, keep:], dim))
    return torch.cat(parts, dim=1)


def unit_size(x):
    """Each token standing for one patch, as before any merge: (B, N, 1)."""
    return torch.ones_like(x[..., :1])


def key_metric(key_t):
    """ToMe's similarity metric: the keys averaged over heads, from (B, heads, C, N) to (B, N, C)."""
    return key_t.mean(dim=1).transpose(1, 2)


def _one_hot(index, n: int, like):
    # Not F.one_hot: it asserts its indices are in range, which TFLite cannot lower.
    # The device argument makes arange an op of the graph, not a traced-in constant.
    return (index.unsqueeze(-1) == torch.arange(n, device=index.device)).to(like.dtype)


def merge(x, size, metric, tokens: int, r: int, cls: bool, distill: bool):
    """Token Merging's bipartite soft matching: merge `r` tokens of x into their most similar.

    x is (B, N, D), size (B, N, 1) the number of patches each token stands for,
    metric (B, N, C) what similarity is measured on (ToMe: the keys, averaged
    over heads). Tokens alternate between sets A and B; the r tokens of A most
    similar to some token of B are added to it, weighted by size. The class
    token (first of A) is never merged away and the distillation token (first
    of B) never receives; the token order is ToMe's, so the next block splits
    A and B the same way. Returns (x, size) with N - r tokens.
    """
    a, b = int(cls), int(distill)  # protected tokens at the front of A and of B
    in_a, in_b = (tokens + 1) // 2 - a, tokens // 2 - b  # candidates: A's may move, B's may receive
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2][:, a:] @ metric[:, 1::2][:, b:].transpose(-1, -2)
    best, match = scores.max(dim=-1)
    order = torch.topk(best, in_a, dim=-1).indices  # A's candidates, most similar first
    src, unmerged = order[:, :r], order[:, r:]
    if cls:  # ToMe keeps the class token's set in index order
        # Ranked by topk's indices: TFLite lowers topk's values alone, or largest=False, to an unsupported sort.
        unmerged = unmerged.gather(1, torch.topk(-unmerged.float(), in_a - r, dim=-1).indices)
    moved = _one_hot(match, in_b, x) * _one_hot(src, in_a, x).sum(dim=1).unsqueeze(-1)  # (B, in_a, in_b)
    stay = _one_hot(unmerged, in_a, x)

    def combine(t):  # t is x * size, or size: both move the same way
        ta, tb = t[:, ::2], t[:, 1::2]
        into_b = tb[:, b:] + moved.transpose(1, 2) @ ta[:, a:]
        parts = [ta[:, :a], tb[:, :b], stay @ ta[:, a:], into_b]
        return torch.cat([p for p, n in zip(parts, (a, b, 1, 1)) if n], dim=1)

    merged_size = combine(size)
    return combine(x * size) / merged_size, merged_size
