"""block_skip: sublayers and whole blocks removed, the residual path kept."""

import copy
import operator

import pytest
import torch
from timm.models.metaformer import MetaFormer
from timm.models.vision_transformer import ParallelThingsBlock, VisionTransformer
from torch import nn

from evc.errors import SpecError
from evc.ir.program import Program
from evc.passes.block_skip import BlockSkip
from evc.spec.plan import ImageInput
from tests.conftest import run_evc
from tests.passes.conftest import SIZE, Ctx, images, outputs, program_of

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


UNRECOGNISED = {  # (model, the last Linear or conv of the branch made least important, what goes with it)
    # MetaFormer (PoolFormer v2): pooling mixers, 1 x 1 conv MLPs, streams scaled per channel in its last stages
    "metaformer": (lambda: MetaFormer(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), num_classes=10),
                   ["stages.2.blocks.0.mlp.fc2"], ["stages.2.blocks.0.norm2", "stages.2.blocks.0.mlp"]),
    # timm's parallel blocks (vit_small_patch16_18x2_224's, without its layer scale of 1e-5, under which every
    # branch adds next to nothing): two MLPs side by side, summed before one add
    "parallel": (lambda: VisionTransformer(img_size=SIZE, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                           num_classes=10, block_fn=ParallelThingsBlock),
                 ["blocks.1.ffns.0.mlp.fc2", "blocks.1.ffns.1.mlp.fc2"], ["blocks.1.ffns"]),
}


def unrecognised(name: str) -> Program:
    torch.manual_seed(0)
    program = Program.from_module(UNRECOGNISED[name][0]().eval(), ImageInput(SIZE, SIZE))
    assert program.structure is None
    return program


@pytest.mark.parametrize("name", list(UNRECOGNISED))
def test_count_on_a_model_evc_does_not_recognise_removes_the_branch_that_adds_least(name):
    program = unrecognised(name)
    _, scaled, removed = UNRECOGNISED[name]
    with torch.no_grad():
        for layer in scaled:
            program.graph.get_submodule(layer).weight.mul_(0.1)
    reference = skipped_by_hand(program.graph, scaled[-1])

    skipped = run(program, count=1, part="mlp", data="calib")
    x = torch.from_numpy(images(4))
    assert (outputs(skipped, x) - reference(x)).abs().max() < 1e-6
    assert (outputs(skipped, x) - outputs(program, x)).abs().max() > 1e-6  # the branch did add something
    gone = sum(p.numel() for prefix in removed for p in program.graph.get_submodule(prefix).parameters())
    assert params(program) - params(skipped) == gone


def skipped_by_hand(gm, layer: str):
    """A copy of `gm` whose first add after `layer` returns its first operand, the stream, in both models."""
    reference = copy.deepcopy(gm)
    nodes = list(reference.graph.nodes)
    after = nodes[next(i for i, n in enumerate(nodes) if n.target == layer):]
    add = next(n for n in after if n.target is operator.add)
    add.replace_all_uses_with(add.args[0])
    reference.graph.erase_node(add)
    reference.recompile()
    return reference


def params(program: Program) -> int:
    return sum(p.numel() for p in program.graph.parameters())


@pytest.mark.parametrize("key", ["attn", "blocks"])
def test_naming_blocks_of_a_model_evc_does_not_recognise_is_a_spec_error_saying_why(key):
    with pytest.raises(SpecError, match=f"{key}: evc does not recognise this model.s blocks .*name none: `count = N`"):
        run(unrecognised("metaformer"), **{key: (0,)})


def test_count_beyond_the_branches_of_that_kind_is_a_spec_error_naming_how_many():
    with pytest.raises(SpecError, match="only 4 residual branches that act on each token alone"):
        run(unrecognised("metaformer"), count=5, part="mlp", data="calib")


def test_a_model_with_no_residual_branch_of_that_kind_is_a_spec_error_saying_so():
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    program = Program.from_module(cnn.eval(), ImageInput(SIZE, SIZE))
    with pytest.raises(SpecError, match="has no residual branches that mix tokens"):
        run(program, count=1, part="attn", data="calib")


@pytest.mark.slow
def test_named_blocks_of_a_model_evc_does_not_recognise_exit_2_at_the_list_through_the_cli(write_spec, tmp_path):
    (tmp_path / "small_metaformer.py").write_text(
        "from timm.models.metaformer import MetaFormer\n\n\n"
        "def build():\n    return MetaFormer(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), num_classes=10)\n")
    spec = write_spec('evc 1\nmodel m {\n    source = python("small_metaformer:build")\n    input = image(32, 32)\n}\n'
                      "compress {\n    block_skip { mlp = [1] }\n}\ntarget cpu { device = cpu, format = onnx }\n")
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 2, done.stderr
    assert f"{spec}:7:24: error: block_skip: mlp: evc does not recognise this model's blocks" in done.stderr
    assert "7 |     block_skip { mlp = [1] }" in done.stderr and "Traceback" not in done.stderr
