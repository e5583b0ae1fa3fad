"""block_skip: sublayers and whole blocks removed, the residual path kept."""

import pytest
import torch

from evc.errors import SpecError
from evc.passes.block_skip import BlockSkip
from tests.passes.conftest import Ctx, images, outputs, program_of

block_skip = BlockSkip().run

NOTHING = dict(attn=(), mlp=(), blocks=(), count=None, part="attn", score="residual", data=None)


def run(program, **params):
    params = {**NOTHING, **params}
    return block_skip(program, params, Ctx(params, images()))


def zero_sublayer(program, index, part):
    """Zero the last Linear of a sublayer: it then adds nothing to the residual stream."""
    block = program.structure.blocks[index]
    linear = program.graph.get_submodule(block.attn.proj if part == "attn" else block.mlp.fc2)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()


def test_nothing_to_skip_leaves_the_outputs_bit_identical(family):
    program = program_of(family)
    assert torch.equal(outputs(run(program)), outputs(program))


def test_skipping_zeroed_sublayers_and_blocks_changes_the_outputs_by_under_1e_5(family):
    program = program_of(family)
    zero_sublayer(program, 1, "attn")
    zero_sublayer(program, 2, "mlp")
    zero_sublayer(program, 3, "attn")
    zero_sublayer(program, 3, "mlp")
    reference = outputs(program)
    skipped = run(program, attn=(1,), mlp=(2,), blocks=(3,))
    parts = [(b.attn is not None, b.mlp is not None) for b in skipped.structure.blocks]
    assert parts[:3] == [(True, True), (False, True), (True, False)]
    assert skipped.structure.depth == program.structure.depth - 1  # block 3 is gone
    assert (outputs(skipped) - reference).abs().max() < 1e-5


@pytest.mark.parametrize("part", ["attn", "mlp", "block"])
def test_count_removes_what_adds_least_to_the_residual_stream(family, part):
    program = program_of(family)
    for sub in (("attn", "mlp") if part == "block" else (part,)):
        zero_sublayer(program, 2, sub)
    reference = outputs(program)
    skipped = run(program, count=1, part=part, data="calib")
    assert (outputs(skipped) - reference).abs().max() < 1e-5
    if part == "block":
        assert skipped.structure.depth == program.structure.depth - 1
    else:
        assert getattr(skipped.structure.blocks[2], part) is None


def test_a_block_index_beyond_the_depth_is_a_spec_error():
    with pytest.raises(SpecError):
        run(program_of("deit_tiny"), attn=(12,))
