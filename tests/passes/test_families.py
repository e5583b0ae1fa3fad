"""ViTs as users bring them: pruned, they still run, save, load, and export to ONNX and TFLite with parity."""

import numpy as np
import pytest
import torch

from evc.ir.program import Program
from evc.passes.ffn_prune import FfnPrune, width
from evc.passes.head_prune import HeadPrune
from evc.passes.surgery import node_named
from evc.targets.onnx import export_onnx, session
from tests.passes.conftest import Ctx, images, outputs, program_of

BROUGHT = ["shape_vit", "torchvision_vit", "hf_vit", "hf_vit_sdpa", "hf_deit_distilled", "einops_vit", "beit", "eva02",
           "cait"]


def pruned(program):
    heads = dict(keep=0.5, score="l1", scope="layer", min_heads=1, data=None)
    hidden = dict(keep=0.5, score="l1", round_to=8, data=None)
    program = HeadPrune().run(program, heads, Ctx(heads, images()))
    return FfnPrune().run(program, hidden, Ctx(hidden, images()))


@pytest.mark.parametrize("family", BROUGHT)
def test_half_the_heads_and_hidden_units_go_and_the_model_still_runs(family):
    program = program_of(family)
    smaller = pruned(program)
    for before, after in zip(program.structure.blocks, smaller.structure.blocks):
        assert after.attn.num_heads == before.attn.num_heads // 2
        assert after.mlp.hidden == width(0.5, before.mlp.hidden, round_to=8)  # EVA-02's 170 keeps 88
    assert outputs(smaller).shape == outputs(program).shape


@pytest.mark.parametrize("family", BROUGHT)
def test_the_pruned_model_saves_and_loads_with_the_same_outputs(family, tmp_path):
    smaller = pruned(program_of(family))
    smaller.save(tmp_path / "program.pt")
    assert torch.equal(Program.load(tmp_path / "program.pt").run(images(4)), outputs(smaller))


@pytest.mark.slow
@pytest.mark.parametrize("family", BROUGHT)
def test_the_pruned_model_exports_to_onnx_with_parity(family, tmp_path):
    smaller = pruned(program_of(family))
    export_onnx(smaller, tmp_path / "model.onnx", opset=17)
    x = images(1)
    np.testing.assert_allclose(session(tmp_path / "model.onnx")(x), outputs(smaller, torch.from_numpy(x)),
                               atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family", BROUGHT)
def test_the_pruned_model_converts_to_tflite_with_parity(family):
    from ai_edge_litert.interpreter import Interpreter

    from evc.targets.tflite import convert

    smaller = pruned(program_of(family))
    run = Interpreter(model_content=convert(smaller)).get_signature_runner()
    x = images(1)
    (y,) = run(input=x).values()
    np.testing.assert_allclose(y, outputs(smaller, torch.from_numpy(x)), atol=1e-4)


def test_a_width_read_from_x_shape_is_rewritten_to_the_pruned_width():
    program = program_of("shape_vit")
    merge = program.structure.blocks[0].attn.head_count_nodes[-1]
    assert isinstance(node_named(program.graph, merge).args[-1], torch.fx.Node)  # `C` of `B, N, C = x.shape`
    smaller = pruned(program)
    attn = smaller.structure.blocks[0].attn
    assert node_named(smaller.graph, attn.head_count_nodes[-1]).args[-1] == attn.num_heads * attn.head_dim


def test_explain_describes_every_block_of_every_family(family):
    structure = program_of(family).structure
    lines = structure.describe().splitlines()
    blocks = [line for line in lines if line.startswith("  block ")]
    assert len(blocks) == structure.depth
    for line, block in zip(blocks, structure.blocks):
        assert f"{block.attn.num_heads}x{block.attn.head_dim}" in line and f"mlp {block.mlp.hidden}" in line
        assert f"{block.tokens} tokens" in line
