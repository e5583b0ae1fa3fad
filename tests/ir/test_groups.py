import copy
import functools

import pytest
import timm
import torch
from timm.models.metaformer import MetaFormer
from torch import fx

from evc.ir.groups import channel_groups
from evc.ir.trace import trace

SIZE = 32
FAMILIES = {  # (model, image size)
    "vit": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=SIZE, patch_size=8, depth=2,
                                      num_classes=10), SIZE),
    # windows of 2 x 2, shifted in every other block; a relative position bias per head; patch merging
    "swin": (lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=64, patch_size=4, window_size=2,
                                       depths=(2, 2), embed_dim=16, num_heads=(2, 4), num_classes=10), 64),
    # two attentions and two MLPs side by side in each block, their outputs stacked and summed
    "parallel": (lambda: timm.create_model("vit_small_patch16_18x2_224", img_size=SIZE, patch_size=8, depth=2,
                                           embed_dim=64, num_heads=4, num_classes=10), SIZE),
    # cross-covariance attention (heads over channels, a temperature per head), class-attention blocks
    "xcit": (lambda: timm.create_model("xcit_nano_12_p16_224", img_size=SIZE, depth=2, num_classes=10), SIZE),
    # conv encoders, then split depthwise convs and cross-covariance attention on maps
    "edgenext": (lambda: timm.create_model("edgenext_xx_small", depths=(1, 1, 1, 1), dims=(16, 32, 48, 64),
                                           num_classes=10), 64),
    # MetaFormer with pooling as its token mixer (PoolFormer v2): 1 x 1 conv MLPs, scales per channel
    "metaformer": (lambda: MetaFormer(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), num_classes=10), 64),
}
EXPECTED = {  # stream widths, (heads, head_dim) of each attention, hidden width of each MLP
    "vit": ([192], [(3, 64)] * 2, [768] * 2),
    "swin": ([16, 32], [(2, 8), (2, 8), (4, 8), (4, 8)], [64, 64, 128, 128]),
    "parallel": ([64], [(4, 16)] * 4, [256] * 4),
    "xcit": ([128], [(4, 32)] * 4, [512] * 4),
    # a block splitting its channels into equal chunks makes the stream one chunk wide: all chunks lose the same
    "edgenext": ([16] * 4, [(4, 8), (4, 12), (4, 16)], [64, 128, 192, 256]),
    "metaformer": ([16, 32, 48, 64, 256], [], [64, 128, 192, 256]),
}


@functools.cache
def _captured(family: str) -> fx.GraphModule:
    torch.manual_seed(0)
    build, size = FAMILIES[family]
    return trace(build().eval(), torch.randn(1, 3, size, size))


def captured(family: str) -> fx.GraphModule:
    """A fresh copy: tests change weights and constants in place."""
    return copy.deepcopy(_captured(family))


@functools.cache
def groups_of(family: str) -> tuple:
    return tuple(channel_groups(_captured(family)))


def of_kind(groups, kind):
    return [g for g in groups if g.kind == kind]


def _set_size(gm: fx.GraphModule, constant, value: int) -> None:
    if isinstance(constant.arg, str):  # a module's attribute
        setattr(gm.get_submodule(constant.node), constant.arg, value)
        return
    node = next(n for n in gm.graph.nodes if n.name == constant.node)
    if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):  # x.reshape((B, N, C)), split(x, [..])
        sizes = list(node.args[1])
        sizes[constant.arg] = value
        node.args = (node.args[0], type(node.args[1])(sizes), *node.args[2:])
    else:
        node.args = tuple(value if i == 1 + constant.arg else a for i, a in enumerate(node.args))


def _tensor(gm: fx.GraphModule, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, leaf)


def pruned_outputs(gm: fx.GraphModule, group, keep, images):
    """The outputs of `gm` with the group's other channels zeroed in every member, then with them removed."""
    with torch.no_grad():
        for member in group.members:
            tensor = _tensor(gm, member.name)
            removed = torch.ones(member.width, dtype=torch.bool)
            removed[torch.as_tensor(group.kept(member, keep))] = False
            tensor.data.index_fill_(member.dim, torch.nonzero(removed).flatten(), 0.0)
        zeroed = gm(images)
        for member in group.members:
            tensor = _tensor(gm, member.name)
            tensor.data = tensor.data.index_select(member.dim, torch.as_tensor(group.kept(member, keep)))
        for constant in group.constants:
            _set_size(gm, constant, constant.value(len(keep)))
        gm.recompile()
        return zeroed, gm(images)


def assert_closed(family: str, index: int) -> None:
    """Removing half of a group's channels from every member changes nothing once they are zeroed."""
    gm, group = captured(family), groups_of(family)[index]
    keep = list(range(0, group.width, 2))
    size = FAMILIES[family][1]
    zeroed, pruned = pruned_outputs(gm, group, keep, torch.randn(2, 3, size, size))
    torch.testing.assert_close(pruned, zeroed, atol=1e-5, rtol=0, msg=lambda m: f"{group}: {m}")


def prunable(family: str) -> list[int]:
    return [i for i, g in enumerate(groups_of(family)) if g.kind in ("heads", "units", "head_dim")]


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in ("xcit", "edgenext") else f
                                    for f in FAMILIES])
def test_groups_are_the_streams_one_heads_group_per_attention_and_one_units_group_per_mlp(family):
    groups = groups_of(family)
    streams, heads, hidden = EXPECTED[family]
    assert [g.width for g in of_kind(groups, "stream")] == streams
    assert [(g.heads, g.head_dim) for g in of_kind(groups, "heads")] == heads
    mlps = [g for g in of_kind(groups, "units") if any(m.name.endswith("mlp.fc1.weight") for m in g.members)]
    assert [g.width for g in mlps] == hidden


SLOW = {"xcit", "swin", "parallel"}  # over 4 s each on 2 cores: the full run checks them


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in FAMILIES])
def test_every_prunable_group_is_closed(family):
    for index in prunable(family):
        assert_closed(family, index)


def test_vit_has_one_stream_a_heads_group_per_attention_and_a_units_group_per_mlp():
    groups = channel_groups(_captured("vit"))
    (stream,) = of_kind(groups, "stream")
    assert stream.width == 192
    assert {"patch_embed.proj.weight", "pos_embed", "cls_token", "head.weight"} <= {m.name for m in stream.members}
    heads = of_kind(groups, "heads")
    assert [(g.heads, g.head_dim) for g in heads] == [(3, 64), (3, 64)]
    assert {(m.name, m.dim) for m in heads[0].members} == {
        ("blocks.0.attn.qkv.weight", 0), ("blocks.0.attn.qkv.bias", 0), ("blocks.0.attn.proj.weight", 1)}
    units = of_kind(groups, "units")
    assert [g.width for g in units] == [768, 768]
    assert {(m.name, m.dim) for m in units[1].members} == {
        ("blocks.1.mlp.fc1.weight", 0), ("blocks.1.mlp.fc1.bias", 0), ("blocks.1.mlp.fc2.weight", 1)}


def test_vit_head_dim_is_frozen_by_sdpa_and_the_classes_by_the_output():
    groups = channel_groups(_captured("vit"))
    frozen = [g.reason for g in of_kind(groups, "frozen")]
    assert "node 'scaled_dot_product_attention' scales by 1/sqrt(head_dim)" in frozen
    assert "it reaches the model's output at node 'head'" in frozen
    assert "it is the model's input 'x'" in frozen


def test_vit_heads_group_rewrites_the_head_count_and_the_merged_width():
    heads = of_kind(channel_groups(_captured("vit")), "heads")[0]
    assert {(c.arg, c.value(2)) for c in heads.constants} == {(3, 2), (2, 128)}




class CumsumMlp(torch.nn.Module):
    """An MLP whose hidden units pass an op with no rule (a cumulative sum mixes them in order)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        return x + self.fc2(torch.cumsum(self.fc1(x), dim=-1))


def test_an_op_with_no_rule_freezes_its_channels_and_names_its_node():
    gm = trace(CumsumMlp(), torch.randn(1, 4, 8))
    hidden = [g for g in channel_groups(gm) if g.width == 32]  # what enters it, and what leaves it
    assert {(g.kind, g.reason) for g in hidden} == {("frozen", "node 'cumsum' (cumsum) has no rule for its channels")}
    members = {(m.name, m.dim) for g in hidden for m in g.members}
    assert members == {("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)}
