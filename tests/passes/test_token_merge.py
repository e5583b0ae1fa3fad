"""token_merge: ToMe's bipartite soft matching, with static shapes, in every block."""

import pytest
import torch

from evc.errors import SpecError
from evc.ir.macs import summarize
from evc.ir.program import Program
from evc.passes.ffn_prune import FfnPrune
from evc.passes.head_prune import HeadPrune
from evc.passes.token_merge import TokenMerge
from evc.spec.plan import ImageInput
from tests.passes.conftest import FAMILIES, SIZE, Ctx, images, outputs, program_of
from tests.vit_reference import bipartite_soft_matching, forward, merge_wavg

ffn_prune = FfnPrune().run
head_prune = HeadPrune().run
token_merge = TokenMerge().run

TIMM = ["deit_tiny", "deit_tiny_distilled", "vit_gap"]


def merged(program, r, proportional=True):
    params = {"r": r, "proportional": proportional}
    return token_merge(program, params, Ctx(params))


def model_and_program(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    return model, Program.from_module(model, ImageInput(SIZE, SIZE))


def tome(model, images, r, proportional=True):
    """ToMe's own timm patch, run block by block."""
    prefix = model.num_prefix_tokens

    def after_attention(index, x, keys, state):
        merge = bipartite_soft_matching(keys.mean(1), r, prefix >= 1, prefix == 2)
        x, state["size"] = merge_wavg(merge, x, state.get("size"))
        if proportional:
            state["attn_size"] = state["size"]
        return x

    return forward(model, images, after_attention=after_attention)


def test_r_0_leaves_the_outputs_bit_identical(family):
    program = program_of(family)
    assert torch.equal(outputs(merged(program, 0)), outputs(program))


@pytest.mark.parametrize("family", TIMM)
@pytest.mark.parametrize("proportional", [True, False])
def test_the_merged_model_equals_tome_within_1e_5(family, proportional):
    model, program = model_and_program(family)
    x = torch.from_numpy(images(4))
    expected = tome(model, x, 3, proportional)
    assert (outputs(merged(program, 3, proportional), x) - expected).abs().max() < 1e-5


@pytest.mark.slow
def test_each_block_runs_on_r_fewer_tokens_and_the_macs_go_down(family):
    program = program_of(family)
    if (reason := program.structure.fixed_token_count()) is not None:
        pytest.skip(f"refused, as test_a_model_with_fixed_token_positions_is_refused_naming_why asserts: {reason}")
    after = merged(program, 2)
    prefix = len(program.structure.prefix_tokens)
    tokens = [program.structure.blocks[0].tokens]
    for _ in after.structure.blocks[1:]:
        tokens.append(tokens[-1] - min(2, (tokens[-1] - prefix) // 2))
    assert [b.tokens for b in after.structure.blocks] == tokens
    before_macs = summarize(program.graph, program.structure, program.example())
    after_macs = summarize(after.graph, after.structure, after.example())
    assert all(a.macs < b.macs for a, b in zip(after_macs.blocks[1:], before_macs.blocks[1:]))


def test_r_is_capped_at_half_the_tokens_left_and_the_cap_is_reported():
    program = program_of("vit_small")  # 17 tokens, 6 blocks
    params = {"r": 6, "proportional": True}
    ctx = Ctx(params)
    after = token_merge(program, params, ctx)
    assert ctx.found["r"] == [6, 5, 2, 1, 1, 0]  # (tokens - 1 class token) // 2 at most
    assert [b.tokens for b in after.structure.blocks] == [17, 11, 6, 4, 3, 2]


def test_a_per_layer_r_merges_only_where_asked():
    program = program_of("vit_small")
    after = merged(program, [0, 0, 4, 0, 0, 0])
    assert [b.tokens for b in after.structure.blocks] == [17, 17, 17, 13, 13, 13]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["deit_tiny", "plain_vit"])
def test_it_combines_with_head_and_ffn_pruning_in_either_order(family):
    program = program_of(family)
    heads = {"keep": 2 / 3, "score": "l1", "scope": "layer", "min_heads": 1, "data": None}
    ffn = {"keep": 0.5, "score": "l1", "round_to": 1, "data": None}

    def structural(p):
        return ffn_prune(head_prune(p, heads, Ctx(heads)), ffn, Ctx(ffn))

    first = structural(merged(program, 2))
    last = merged(structural(program), 2)
    assert [b.tokens for b in first.structure.blocks] == [b.tokens for b in last.structure.blocks]
    assert [b.attn.num_heads for b in first.structure.blocks] == [2] * program.structure.depth
    assert (outputs(first) - outputs(last)).abs().max() < 1e-5


@pytest.mark.slow
def test_a_merged_program_reloads_with_its_structure_and_outputs(tmp_path):
    after = merged(program_of("deit_tiny_distilled"), 2)
    after.save(tmp_path / "program.pt")
    loaded = Program.load(tmp_path / "program.pt")
    assert loaded.structure == after.structure
    assert torch.equal(outputs(loaded), outputs(after))


@pytest.mark.parametrize("family, why", [("beit", "relative position bias"), ("eva02", "rotary embedding"),
                                         ("cait", "class-attention block")])
def test_a_model_with_fixed_token_positions_is_refused_naming_why(family, why):
    with pytest.raises(SpecError, match=f"r: cannot merge tokens: block 0 .*{why}" if family != "cait" else why):
        merged(program_of(family), 2)
