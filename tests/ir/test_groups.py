import functools

import pytest
import timm
import torch
from torch import fx

from evc.ir.groups import channel_groups
from evc.ir.trace import trace

SIZE = 32
FAMILIES = {
    "vit": lambda: timm.create_model("vit_tiny_patch16_224", img_size=SIZE, patch_size=8, depth=2, num_classes=10),
}


@functools.cache
def _captured(family: str) -> fx.GraphModule:
    torch.manual_seed(0)
    return trace(FAMILIES[family]().eval(), torch.randn(1, 3, SIZE, SIZE))


def captured(family: str) -> fx.GraphModule:
    """A fresh copy: tests change weights and constants in place."""
    import copy

    return copy.deepcopy(_captured(family))


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


def assert_closed(family: str, group_index: int, images) -> None:
    """Removing half of the group's channels from every member changes nothing once they are zeroed."""
    gm = captured(family)
    group = channel_groups(gm)[group_index]
    keep = list(range(0, group.width, 2))
    zeroed, pruned = pruned_outputs(gm, group, keep, images)
    torch.testing.assert_close(pruned, zeroed, atol=1e-5, rtol=0)


def prunable(family: str) -> list[int]:
    return [i for i, g in enumerate(channel_groups(_captured(family))) if g.kind in ("heads", "units", "head_dim")]


IMAGES = torch.randn(2, 3, SIZE, SIZE)


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


@pytest.mark.parametrize("index", prunable("vit"))
def test_vit_groups_are_closed(index):
    assert_closed("vit", index, IMAGES)
