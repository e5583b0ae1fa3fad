"""Heads found on zoo models (tests/zoo.py) whose attention needs more than a matmul's rule: each heads
group is closed (cutting half its heads equals zeroing them first), and head_prune cuts it."""

import copy
import functools

import pytest
import torch

from evc.ir.groups import channel_groups
from evc.ir.program import Program
from evc.passes.surgery.groups import keep_groups, zero_groups
from evc.spec.plan import ImageInput
from tests.zoo import ZOO


@functools.cache
def _program(name: str) -> Program:
    model, size, output = ZOO[name]()
    return Program.from_module(model, ImageInput(size, size), output=output)


def heads_of(name: str) -> list:
    return [(g.heads, g.head_dim) for g in channel_groups(_program(name).graph) if g.kind == "heads"]


def assert_heads_closed(name: str) -> None:
    """Half of each heads group cut equals it zeroed, on a batch of two (sizes read from the batch follow it)."""
    program = _program(name)
    images = torch.randn(2, *program.example().shape[1:])
    groups = [g for g in channel_groups(program.graph) if g.kind == "heads" and g.width > 1]
    assert groups
    for group in groups:
        cut = [(group, list(range(0, group.width, 2)))]
        zeroed, pruned = copy.deepcopy(program.graph), copy.deepcopy(program.graph)
        zero_groups(zeroed, cut)
        keep_groups(pruned, cut)
        with torch.no_grad():
            torch.testing.assert_close(pruned(images), zeroed(images), atol=1e-5, rtol=0,
                                       msg=lambda m, g=group: f"{g.members[0].name}: {m}")


def test_twins_local_attention_reads_its_window_size_from_the_heads_axis_and_still_cuts():
    # reshape(B, _h, _w, ws, ws, C) is traced with ws read from the attention's heads axis (both are 2)
    assert heads_of("twins_svt") == [(2, 16), (3, 16), (4, 16)]
    assert_heads_closed("twins_svt")


def test_samvit_heads_ride_the_window_batch_through_its_relative_position_einsums():
    assert heads_of("samvit") == [(4, 16), (4, 16)]
    assert_heads_closed("samvit")


def test_vit_srelpos_heads_carry_through_the_gathered_position_bias_shared_by_all_blocks():
    assert heads_of("vit_srelpos") == [(4, 16)]
    assert_heads_closed("vit_srelpos")


@pytest.mark.parametrize("name", ["swinv2", "hf_swinv2"])
def test_swinv2_cosine_attention_freezes_head_dim_alone_and_its_position_mlp_and_logit_scale_join_the_heads(name):
    assert heads_of(name) == [(2, 16)]  # the first stage's one head is no group: nothing could narrow it
    (heads,) = [g for g in channel_groups(_program(name).graph) if g.kind == "heads" and g.width == 2]
    assert any("logit_scale" in m.name for m in heads.members)
    assert any("continuous_position_bias_mlp.2" in m.name or "cpb_mlp.2" in m.name for m in heads.members)
    assert_heads_closed(name)


def test_convit_gated_positional_attention_heads_take_their_position_projection_and_gate():
    assert heads_of("convit") == [(4, 16), (4, 16)]
    (gpsa, _) = [g for g in channel_groups(_program("convit").graph) if g.kind == "heads"]
    assert {"blocks.0.attn.pos_proj.weight", "blocks.0.attn.gating_param"} <= {m.name for m in gpsa.members}
    assert_heads_closed("convit")


def test_tiny_vit_heads_lead_q_k_and_v_side_by_side_and_are_heads_not_units():
    # qkv.reshape(B, N, heads, -1).split([key_dim, key_dim, d], dim=3): head_dim is q's part
    assert heads_of("tiny_vit") == [(2, 16), (3, 16), (4, 16)]
    assert_heads_closed("tiny_vit")


def test_coat_lite_heads_split_by_window_size_are_three_groups_cut_together_in_one_weight():
    # its conv relative position encoding splits v's 8 heads into 2, 3 and 3 for windows of 3, 5 and 7:
    # three heads groups sharing one qkv weight, which keep_groups slices once for all three
    assert heads_of("coat_lite") == [(n, d) for d in (2, 4, 6, 8) for n in (2, 3, 3)]
    program = _program("coat_lite")
    groups = [g for g in channel_groups(program.graph) if g.kind == "heads"]
    cuts = [(g, list(range(0, g.width, 2))) for g in groups]
    zeroed, pruned = copy.deepcopy(program.graph), copy.deepcopy(program.graph)
    zero_groups(zeroed, cuts)
    keep_groups(pruned, cuts)
    images = torch.randn(2, *program.example().shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(pruned(images), zeroed(images), atol=1e-5, rtol=0)
    assert pruned.get_submodule("serial_blocks1.0.factoratt_crpe.qkv").out_features == 3 * 2 * (1 + 2 + 2)


@pytest.mark.parametrize("name", ["twins_svt", "samvit", "vit_srelpos", "swinv2", "hf_swinv2", "tiny_vit",
                                  "coat_lite"])
def test_head_prune_cuts_the_heads_found(name):
    from tests.passes.test_zoo import macs, run

    pruned, said = run(_program(name), "head_prune")
    assert pruned is not None, said
    assert macs(pruned) < macs(_program(name))
