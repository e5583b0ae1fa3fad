"""patch_slim: patches dropped before each block by attention score, with static token counts."""

import pytest
import torch

from evc.errors import SpecError
from evc.ir.macs import summarize
from evc.ir.program import Program
from evc.passes.ffn_prune import FfnPrune
from evc.passes.head_prune import HeadPrune
from evc.passes.patch_slim import PatchSlim, counts, entering, share
from evc.passes.surgery import features
from tests.passes.conftest import Ctx, images, outputs, program_of
from tests.passes.test_token_merge import TIMM, model_and_program
from tests.vit_reference import evit_slim, forward

ffn_prune = FfnPrune().run
head_prune = HeadPrune().run
patch_slim = PatchSlim().run


def keep_for(program):
    return [1, 1, 0.7, 0.7] + [0.5] * (program.structure.depth - 4)


def slimmed(program, keep, fuse=False, score=None, search=None, data=None):
    score = score or ("cls_attention" if program.structure.prefix_tokens else "mean_attention")
    params = {"keep": keep, "score": score, "fuse": fuse, "search": search}
    ctx = Ctx(params, data if data is not None else images())
    return patch_slim(program, params, ctx), ctx


def evit(model, images, kept, score, fuse):
    """EViT's / Patch Slimming's token selection with argsort, before each block."""
    prefix = model.num_prefix_tokens

    def before_block(index, x, state):
        if index == 0 or kept[index] >= x.shape[1] - prefix:
            return x
        probs = state["probs"]
        if score == "cls_attention":
            rank = probs[:, :, 0, prefix:].mean(1)
        else:
            rank = probs[:, :, :, prefix:].mean((1, 2))
        return evit_slim(x, rank, prefix, kept[index], fuse)

    return forward(model, images, before_block=before_block)


def test_keep_1_leaves_the_outputs_bit_identical(family):
    program = program_of(family)
    after, _ = slimmed(program, 1.0)
    assert torch.equal(outputs(after), outputs(program))


@pytest.mark.parametrize("family", TIMM)
@pytest.mark.parametrize("fuse", [False, True])
def test_the_slimmed_model_equals_evits_selection_within_1e_5(family, fuse):
    model, program = model_and_program(family)
    keep = keep_for(program)
    after, _ = slimmed(program, keep, fuse)
    prefix = len(program.structure.prefix_tokens)
    kept = counts(16, keep, fuse, 0 if prefix else 1)
    x = torch.from_numpy(images(4))
    score = "cls_attention" if program.structure.pool == "token" else "mean_attention"
    assert (outputs(after, x) - evit(model, x, kept, score, fuse)).abs().max() < 1e-5


def test_attention_and_mlp_of_a_slimmed_block_both_run_on_the_kept_tokens(family):
    program = program_of(family)
    if (reason := program.structure.fixed_token_count()) is not None:
        pytest.skip(f"refused, as test_a_model_with_fixed_token_positions_is_refused_naming_why asserts: {reason}")
    after, _ = slimmed(program, [1] + [0.5] * (program.structure.depth - 1))
    prefix = len(program.structure.prefix_tokens)
    patches = program.structure.blocks[0].tokens - prefix
    expected = [prefix + k for k in counts(patches, [1] + [0.5] * (program.structure.depth - 1), False,
                                           0 if prefix else 1)]
    assert [b.tokens for b in after.structure.blocks] == expected
    nodes = {n.name: n for n in after.graph.graph.nodes}
    for block, tokens in zip(after.structure.blocks, expected):
        fc1 = next(n for n in nodes.values() if n.op == "call_module" and n.target == block.mlp.fc1)
        assert fc1.meta["tensor_meta"].shape[1] == tokens  # the MLP too, not padded back
    before_macs = summarize(program.graph, program.structure, program.example())
    after_macs = summarize(after.graph, after.structure, after.example())
    assert after_macs.total.macs < 0.6 * before_macs.total.macs


def test_fuse_adds_one_token_where_patches_are_dropped():
    program = program_of("deit_tiny_distilled")
    after, _ = slimmed(program, keep_for(program), fuse=True)
    # 2 prefix tokens, then 16 patches kept as 11 + 1 fused, 8 + 1, 5 + 1, 3 + 1
    assert [b.tokens for b in after.structure.blocks] == [18, 18, 14, 11, 8, 6]


def test_counts_and_shares_round_trip():
    kept = [64, 64, 45, 31, 0]
    coming = entering(64, kept, fuse=True)
    assert coming == [64, 64, 64, 46, 32]
    shares = [1.0] + [share(k, m) for k, m in zip(kept[1:], coming[1:])]
    assert counts(64, shares, True, 0) == kept


def test_cls_attention_on_a_model_without_a_class_token_is_an_error_naming_the_key():
    with pytest.raises(SpecError):
        slimmed(program_of("vit_gap"), 0.5, score="cls_attention")


def test_it_combines_with_head_and_ffn_pruning_in_either_order():
    program = program_of("deit_tiny_distilled")
    heads = {"keep": 0.5, "score": "l2", "scope": "layer", "min_heads": 1, "data": None}
    ffn = {"keep": 0.5, "score": "l1", "round_to": 1, "data": None}

    def structural(p):
        return ffn_prune(head_prune(p, heads, Ctx(heads)), ffn, Ctx(ffn))

    first = structural(slimmed(program, keep_for(program), fuse=True)[0])
    last = slimmed(structural(program), keep_for(program), fuse=True)[0]
    assert [b.tokens for b in first.structure.blocks] == [b.tokens for b in last.structure.blocks]
    assert (outputs(first) - outputs(last)).abs().max() < 1e-5


@torch.no_grad()
def features_error(program: Program, slim: Program, data) -> float:
    x = torch.from_numpy(data)
    reference = features(program.graph, program.structure.head)(x)
    return float((features(slim.graph, slim.structure.head)(x) - reference).norm() / reference.norm())


# Random-weight models: a mean over tokens (vit_gap) feels every dropped patch, so it needs a looser tolerance.
@pytest.mark.slow
@pytest.mark.parametrize("family, tolerance", [("deit_tiny", 0.05), ("vit_gap", 0.4)])
def test_search_finds_a_shrinking_schedule_within_tolerance_that_pastes_back_as_keep(family, tolerance):
    program, data = program_of(family), images(8)
    search = {"tolerance": tolerance, "step": 2, "data": "calib"}
    after, ctx = slimmed(program, 1.0, search=search, data=data)
    tokens = [b.tokens for b in after.structure.blocks]
    assert tokens == sorted(tokens, reverse=True) and tokens[-1] < tokens[0]
    assert features_error(program, after, data) <= tolerance
    keep = ctx.found["keep"]
    assert keep[0] == 1 and len(keep) == program.structure.depth
    pasted, _ = slimmed(program, keep)
    assert torch.equal(outputs(pasted), outputs(after))


@pytest.mark.slow
def test_a_looser_tolerance_keeps_fewer_patches_and_a_tiny_one_keeps_all():
    program, data = program_of("deit_tiny"), images(8)

    def tokens(tolerance):
        search = {"tolerance": tolerance, "step": 2, "data": "calib"}
        return sum(b.tokens for b in slimmed(program, 1.0, search=search, data=data)[0].structure.blocks)

    assert tokens(0.3) < tokens(0.05) < tokens(1e-9) == program.structure.depth * 17


@pytest.mark.parametrize("family, why", [("beit", "blocks_0_attn_attention_bias"), ("eva02", "_tensor_constant"),
                                         ("cait", "block 2 is a class-attention block")])
def test_a_model_with_fixed_token_positions_is_refused_naming_why(family, why):
    program = program_of(family)
    with pytest.raises(SpecError, match=f"keep: cannot drop patches: .*{why}"):
        slimmed(program, [1] + [0.5] * (program.structure.depth - 1))
