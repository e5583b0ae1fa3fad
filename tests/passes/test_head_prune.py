"""head_prune: whole heads removed for real, on every model family."""

import pytest
import torch

from evc.passes.head_prune import HeadPrune
from tests.passes.conftest import Ctx, images, outputs, program_of, zero_heads

head_prune = HeadPrune().run

LAYER = dict(score="l1", scope="layer", min_heads=1, data=None)


def run(program, **params):
    params = {**LAYER, **params}
    return head_prune(program, params, Ctx(params, images()))


def test_keep_1_leaves_the_outputs_bit_identical(family):
    program = program_of(family)
    pruned = run(program, keep=1.0)
    assert torch.equal(outputs(pruned), outputs(program))


@pytest.mark.parametrize("score", ["l1", "l2", "taylor"])
def test_pruning_heads_zeroed_first_changes_the_outputs_by_under_1e_5(family, score):
    program = program_of(family)
    heads = program.structure.blocks[0].attn.num_heads
    zeroed = [1] if heads == 3 else [0, heads - 2]
    zero_heads(program, {b.index: zeroed for b in program.structure.blocks})
    reference = outputs(program)
    pruned = run(program, keep=(heads - len(zeroed)) / heads, score=score, data="calib")
    assert [b.attn.num_heads for b in pruned.structure.blocks] == [heads - len(zeroed)] * program.structure.depth
    assert (outputs(pruned) - reference).abs().max() < 1e-5
    removed = len(zeroed) * program.structure.blocks[0].attn.head_dim
    qkv = pruned.structure.blocks[0].attn.qkv
    assert sum(pruned.graph.get_submodule(q).out_features for q in qkv) == \
        sum(program.graph.get_submodule(q).out_features for q in program.structure.blocks[0].attn.qkv) \
        - removed * (3 if len(qkv) == 1 else len(qkv))


def test_global_scope_ranks_heads_across_layers(family):
    program = program_of(family)
    depth, heads = program.structure.depth, program.structure.blocks[0].attn.num_heads
    zero_heads(program, {0: [0, 2], depth - 1: [1]})
    reference = outputs(program)
    pruned = run(program, keep=(depth * heads - 3) / (depth * heads), scope="global", score="taylor")
    counts = [b.attn.num_heads for b in pruned.structure.blocks]
    assert counts == [heads - 2] + [heads] * (depth - 2) + [heads - 1]
    assert (outputs(pruned) - reference).abs().max() < 1e-5


def test_every_layer_keeps_min_heads():
    pruned = run(program_of("vit_small"), keep=0.01, min_heads=2)
    assert {b.attn.num_heads for b in pruned.structure.blocks} == {2}


def test_a_per_layer_keep_list_prunes_each_layer_by_its_own_share():
    program = program_of("vit_small")
    pruned = run(program, keep=[1, 1, 0.5, 0.5, 1 / 3, 1 / 6])
    assert [b.attn.num_heads for b in pruned.structure.blocks] == [6, 6, 3, 3, 2, 1]


def test_keep_two_thirds_of_three_heads_is_two():
    pruned = run(program_of("deit_tiny"), keep=2 / 3)
    assert {b.attn.num_heads for b in pruned.structure.blocks} == {2}


def test_the_head_count_the_graph_reshapes_by_is_rewritten():
    program = program_of("deit_tiny")
    pruned = run(program, keep=2 / 3)
    nodes = {n.name: n for n in pruned.graph.graph.nodes}
    split = nodes[pruned.structure.blocks[0].attn.head_count_nodes[0]]
    assert tuple(split.meta["tensor_meta"].shape)[2:] == (3, 2, 64)


def test_a_head_split_the_structures_surgery_cannot_rewrite_is_cut_by_the_graphs_groups_saying_so():
    from evc.ir.program import Program
    from evc.spec.plan import ImageInput
    from tests.passes.conftest import FAMILIES

    model = FAMILIES["plain_vit"]()
    for layer in model.layers:
        attn = layer.attn
        attn.split_heads = lambda t, heads=attn.heads: t.unflatten(-1, (heads, -1)).transpose(1, 2)
    program = Program.from_module(model.eval(), ImageInput(32, 32))
    heads = program.structure.blocks[0].attn.num_heads
    zero_heads(program, {b.index: [0] for b in program.structure.blocks})
    reference = outputs(program)
    params = {**LAYER, "keep": (heads - 1) / heads}
    ctx = Ctx(params, images())
    pruned = head_prune(program, params, ctx)
    (warning,) = ctx.warnings
    assert "block 0: node 'unflatten" in warning and "cutting the graph's pruning groups instead" in warning
    assert [b.attn.num_heads for b in pruned.structure.blocks] == [heads - 1] * program.structure.depth
    assert (outputs(pruned) - reference).abs().max() < 1e-5
