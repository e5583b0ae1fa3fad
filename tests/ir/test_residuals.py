import operator

import torch
from torch import fx, nn

from evc.ir.residuals import residual_branches
from evc.ir.trace import trace
from evc.ir.view import node_shape
from tests.ir.test_groups import captured


def kinds(branches) -> list[str]:
    return [b.kind for b in branches]


def test_vit_has_an_attention_then_an_mlp_branch_per_block_each_reading_the_last():
    branches = residual_branches(captured("vit"))
    assert kinds(branches) == ["attn", "mlp"] * 2  # the position embedding's add is none
    assert [b.skip for b in branches[1:]] == [b.add for b in branches[:-1]]
    assert "blocks_0_attn_qkv" in branches[0].nodes and "blocks_0_mlp_fc1" in branches[1].nodes


def test_parallel_attentions_summed_before_one_add_are_one_branch():
    branches = residual_branches(captured("parallel"))
    assert kinds(branches) == ["attn", "mlp"] * 2
    assert {"blocks_0_attns_0_attn_qkv", "blocks_0_attns_1_attn_qkv"} <= set(branches[0].nodes)
    assert {"blocks_0_ffns_0_mlp_fc1", "blocks_0_ffns_1_mlp_fc1"} <= set(branches[1].nodes)


def test_metaformer_pooling_mixers_and_mlps_are_found_on_scaled_streams_of_every_width():
    gm = captured("metaformer")
    branches = residual_branches(gm)
    assert kinds(branches) == ["attn", "mlp"] * 4  # StarReLU's `s * relu(x) ** 2 + b` is no residual
    assert [node_shape(_node(gm, b.add))[1] for b in branches] == [16, 16, 32, 32, 48, 48, 64, 64]
    # the last two stages scale their stream (res-scale): the skip is x times a constant per channel
    scaled = _node(gm, branches[4].skip)
    assert scaled.target is operator.mul and scaled.args[0].name == "stages_2_downsample_conv"


def test_swin_has_an_attention_then_an_mlp_branch_per_block_shifted_windows_inside():
    branches = residual_branches(captured("swin"))
    assert kinds(branches) == ["attn", "mlp"] * 4
    assert any(n.startswith("roll") for n in branches[2].nodes)  # block 1 shifts its windows


def test_a_branchs_nodes_are_exactly_what_goes_when_its_add_passes_the_skip_on():
    for family in ("vit", "metaformer", "swin"):
        for branch in residual_branches(captured(family)):
            gm = captured(family)
            gm.graph.eliminate_dead_code()  # unused shape reads, there before any branch goes
            before = {n.name for n in gm.graph.nodes}
            add = _node(gm, branch.add)
            add.replace_all_uses_with(_node(gm, branch.skip))
            gm.graph.erase_node(add)
            gm.graph.eliminate_dead_code()
            assert before - {n.name for n in gm.graph.nodes} == {branch.add, *branch.nodes}, family


class ConvMixerBlock(nn.Module):
    """x + depthwise conv(x), then x + an MLP of 1 x 1 convs whose GELU is written out (tanh form)."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.mixer = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.fc1, self.fc2 = nn.Conv2d(dim, 4 * dim, 1), nn.Conv2d(4 * dim, dim, 1)

    def forward(self, x):
        x = x + self.mixer(x)
        h = self.fc1(x)
        h = 0.5 * h * (1 + torch.tanh(0.7978845608 * (h + 0.044715 * h ** 3)))
        return x + self.fc2(h)


def test_a_depthwise_conv_mixes_tokens_and_an_add_without_weights_is_no_branch():
    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), ConvMixerBlock(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10))
    branches = residual_branches(trace(model.eval(), torch.randn(1, 3, 16, 16)))
    assert kinds(branches) == ["attn", "mlp"]  # `h + 0.044715 * h ** 3` is inside the MLP, not a residual


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)
