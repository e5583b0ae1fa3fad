"""The static-shape token ops against the papers' own dynamic-shape code."""

import pytest
import torch

from evc.passes import tokens
from tests.vit_reference import bipartite_soft_matching, evit_slim, merge_wavg


@pytest.mark.parametrize("n, r, cls, distill", [
    (65, 8, True, False), (65, 16, True, False), (66, 8, True, True), (64, 8, False, False), (17, 8, True, False),
])
def test_merge_equals_tomes_bipartite_soft_matching(n, r, cls, distill):
    torch.manual_seed(n + r)
    x, metric, size = torch.randn(3, n, 32), torch.randn(3, n, 16), torch.rand(3, n, 1) + 0.5
    expected, expected_size = merge_wavg(bipartite_soft_matching(metric, r, cls, distill), x, size)
    merged, merged_size = tokens.merge(x, size, metric, n, r, cls, distill)
    assert merged.shape == (3, n - r, 32)
    assert (merged - expected).abs().max() < 1e-5
    assert (merged_size - expected_size).abs().max() < 1e-5


def test_merge_keeps_the_class_token_first_and_its_value():
    torch.manual_seed(0)
    x = torch.randn(2, 33, 8)
    x[:, 0] = 100.0  # the class token, far from every other: ToMe must still not merge it
    merged, size = tokens.merge(x, torch.ones(2, 33, 1), x, 33, 16, True, False)
    assert torch.equal(merged[:, 0], x[:, 0])
    assert torch.equal(size[:, 0], torch.ones(2, 1))
    assert size.sum(dim=1).eq(33).all()  # every patch is counted once


@pytest.mark.parametrize("prefix, keep, fuse", [(1, 5, False), (1, 5, True), (2, 3, True), (0, 7, True), (1, 0, True)])
def test_slim_equals_evits_selection(prefix, keep, fuse):
    torch.manual_seed(keep)
    patches = 12
    x, score = torch.randn(2, prefix + patches, 16), torch.rand(2, patches)
    slimmed = tokens.slim(x, score, prefix, patches, keep, 16, fuse)
    assert slimmed.shape == (2, prefix + keep + fuse, 16)
    assert (slimmed - evit_slim(x, score, prefix, keep, fuse)).abs().max() < 1e-6


def test_slim_to_no_patch_keeps_the_prefix_tokens_alone():
    x = torch.randn(2, 9, 4)
    assert torch.equal(tokens.slim(x, torch.rand(2, 8), 1, 8, 0, 4, False), x[:, :1])


def test_class_and_mean_attention_rank_patches_by_the_weights_they_get():
    probs = torch.zeros(1, 2, 4, 4)
    probs[:, :, 0, 2] = 1.0  # the class token looks at patch 1 (token 2)
    probs[:, :, 1:, 3] = 1.0  # every other token looks at patch 2 (token 3)
    assert tokens.class_attention(probs, 1).argmax().item() == 1
    assert tokens.mean_attention(probs, 1).argmax().item() == 2
