"""ffn_prune: MLP hidden units removed for real, on every model family."""

import pytest
import torch

from evc.passes.ffn_prune import FfnPrune, width
from tests.passes.conftest import Ctx, images, outputs, program_of, zero_hidden

ffn_prune = FfnPrune().run


def run(program, **params):
    params = {"score": "l1", "round_to": 8, "data": None, **params}
    return ffn_prune(program, params, Ctx(params, images()))


def test_keep_1_leaves_the_outputs_bit_identical(family):
    program = program_of(family)
    assert torch.equal(outputs(run(program, keep=1.0)), outputs(program))


@pytest.mark.parametrize("score", ["l1", "l2", "taylor", "activation"])
def test_pruning_units_zeroed_first_changes_the_outputs_by_under_1e_5(family, score):
    program = program_of(family)
    hidden = program.structure.blocks[0].mlp.hidden
    zeroed = list(range(0, hidden, 3))  # a third of the units, spread out
    zero_hidden(program, {b.index: zeroed for b in program.structure.blocks})
    reference = outputs(program)
    pruned = run(program, keep=(hidden - len(zeroed)) / hidden, round_to=1, score=score, data="calib")
    assert [b.mlp.hidden for b in pruned.structure.blocks] == [hidden - len(zeroed)] * program.structure.depth
    assert (outputs(pruned) - reference).abs().max() < 1e-5


def test_round_to_keeps_the_width_a_multiple():
    pruned = run(program_of("deit_tiny"), keep=0.7, round_to=16)
    assert {b.mlp.hidden for b in pruned.structure.blocks} == {544}  # 0.7 × 768 = 537.6 → 544 = 34 × 16


@pytest.mark.parametrize("keep, hidden, round_to, expected", [
    (1.0, 768, 8, 768), (0.5, 768, 8, 384), (0.001, 768, 8, 8), (0.7, 768, 16, 544),
    (0.99, 100, 8, 96), (0.99, 103, 8, 103)])
def test_width_rounds_to_the_nearest_multiple_within_bounds(keep, hidden, round_to, expected):
    assert width(keep, hidden, round_to) == expected


def test_params_and_macs_go_down_by_the_units_removed():
    from evc.ir.macs import summarize

    program = program_of("deit_tiny")
    pruned = run(program, keep=0.5)
    before = summarize(program.graph, program.structure, program.example())
    after = summarize(pruned.graph, pruned.structure, pruned.example())
    removed = program.structure.depth * 384  # units removed
    assert before.params - after.params == removed * (192 + 1 + 192)  # an fc1 row with its bias, an fc2 column
    assert before.macs - after.macs == removed * 17 * 2 * 192  # 17 tokens through fc1 and fc2


def _plain_vit_with(ffn):
    from evc.ir.program import Program
    from evc.spec.plan import ImageInput
    from tests.passes.conftest import FAMILIES

    model = FAMILIES["plain_vit"]()
    for layer in model.layers:
        layer.ffn = ffn(*layer.ffn)
    return Program.from_module(model.eval(), ImageInput(32, 32))


def test_a_norm_over_the_hidden_units_keeps_the_weights_of_the_kept_units():
    from torch import nn

    program = _plain_vit_with(lambda fc1, act, fc2: nn.Sequential(fc1, act, nn.LayerNorm(fc1.out_features), fc2))
    norm = program.graph.get_submodule("layers.0.ffn.2")
    with torch.no_grad():
        norm.weight.copy_(torch.randn_like(norm.weight))
    pruned = run(program, keep=0.5)
    kept = pruned.graph.get_submodule("layers.0.ffn.2")
    assert kept.normalized_shape == (pruned.structure.blocks[0].mlp.hidden,) == (384,)
    assert all(any(torch.equal(w, v) for v in norm.weight) for w in kept.weight)  # its own units' weights
    assert outputs(pruned).shape == outputs(program).shape


class _ConvMlp(torch.nn.Module):
    """An MLP with a dense 3 x 3 convolution over its hidden units, on the patch grid: every unit mixes into
    every other, which the recognised MLP's surgery cannot cut. The class token skipping the conv ties each
    unit's conv input and output to one channel, so the graph's groups can."""

    def __init__(self, fc1, act, fc2):
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, act, fc2
        self.dwconv = torch.nn.Conv2d(fc1.out_features, fc1.out_features, 3, padding=1)

    def forward(self, x):
        x = self.fc1(x)
        cls, patches = x[:, :1], x[:, 1:]
        grid = patches.transpose(1, 2).reshape(x.shape[0], -1, 8, 8)
        patches = self.dwconv(grid).flatten(2).transpose(1, 2)
        return self.fc2(self.act(torch.cat([cls, patches], dim=1)))


def test_a_per_unit_scale_in_the_mlp_is_sliced_with_its_units():
    from timm.layers import LayerScale
    from torch import nn

    program = _plain_vit_with(lambda fc1, act, fc2: nn.Sequential(fc1, act, LayerScale(fc1.out_features, 0.5), fc2))
    pruned = run(program, keep=0.5)
    assert pruned.structure.blocks[0].mlp.hidden == 384
    assert outputs(pruned).shape == outputs(program).shape


def test_a_conv_over_the_hidden_units_is_cut_by_the_graphs_groups_naming_the_block_and_node():
    program = _plain_vit_with(_ConvMlp)
    mlp = program.structure.blocks[0].mlp
    zeroed = list(range(0, mlp.hidden, 2))
    with torch.no_grad():  # each zeroed unit: its fc1 row, the conv's filters from and to it, its fc2 column
        for block in program.structure.blocks:
            ffn = block.mlp.fc1.rpartition(".")[0]
            fc1, conv, fc2 = (program.graph.get_submodule(f"{ffn}.{n}") for n in ("fc1", "dwconv", "fc2"))
            fc1.weight[zeroed], fc1.bias[zeroed] = 0, 0
            conv.weight[zeroed], conv.weight[:, zeroed], conv.bias[zeroed] = 0, 0, 0
            fc2.weight[:, zeroed] = 0
    reference = outputs(program)
    params = {"score": "l1", "round_to": 8, "data": None, "keep": 0.5}
    ctx = Ctx(params, images())
    pruned = ffn_prune(program, params, ctx)
    assert ctx.warnings == [
        "the recognised structure's surgery failed (block 0: node 'layers_0_ffn_dwconv' has weights over the "
        "MLP's hidden units; ffn_prune cannot remove units under it); cutting the graph's pruning groups instead"]
    assert pruned.graph.get_submodule("layers.0.ffn.dwconv").weight.shape[:2] == (mlp.hidden // 2,) * 2
    assert (outputs(pruned) - reference).abs().max() < 1e-5


def test_a_swiglu_mlp_prunes_value_and_gate_rows_together_and_zeroed_units_go_exactly():
    from timm.layers import SwiGLU

    program = _plain_vit_with(lambda fc1, act, fc2: SwiGLU(fc1.in_features, fc1.out_features))
    mlp = program.structure.blocks[0].mlp
    zeroed = list(range(0, mlp.hidden, 3))
    zero_hidden(program, {b.index: zeroed for b in program.structure.blocks})
    reference = outputs(program)
    pruned = run(program, keep=(mlp.hidden - len(zeroed)) / mlp.hidden, round_to=1)
    after = pruned.structure.blocks[0].mlp
    assert pruned.graph.get_submodule(after.gate).out_features == after.hidden == mlp.hidden - len(zeroed)
    assert (outputs(pruned) - reference).abs().max() < 1e-5
