"""Hierarchical ViTs (Swin, PVT-v2): stages of their own width, pruned head by head and unit by unit."""

import copy
import dataclasses
import functools

import numpy as np
import pytest
import timm
import torch

from evc.errors import SpecError
from evc.ir.program import Program, RecognitionError
from evc.passes.block_skip import BlockSkip
from evc.passes.ffn_prune import FfnPrune
from evc.passes.head_prune import HeadPrune
from evc.passes.patch_slim import PatchSlim
from evc.passes.token_merge import TokenMerge
from evc.spec.plan import ImageInput
from evc.targets.onnx import export_onnx, session
from tests.passes.conftest import Ctx, zero_heads, zero_hidden

SIZE = 64
STAGED = {
    # windows of 2 x 2 on a 16 x 16 grid, shifted every other block; a relative position bias per head
    "swin": lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=SIZE, patch_size=4, window_size=2,
                                      depths=(2, 2, 2, 1), embed_dim=16, num_heads=(2, 2, 4, 4), num_classes=10),
    # an overlapping patch embedding, keys and values from a strided conv, a depthwise conv in the MLP
    "pvt_v2": lambda: timm.create_model("pvt_v2_b0", depths=(2, 2, 1, 1), embed_dims=(16, 32, 32, 64),
                                        num_heads=(2, 2, 4, 4), num_classes=10),
    # a convolutional stem, Linear + BatchNorm everywhere, q | k | v split per head, an attention bias per
    # head, downsampling by attention (then an MLP alone), two heads
    "levit": lambda: timm.create_model("levit_128s", img_size=SIZE, embed_dim=(32, 48, 64), num_heads=(2, 3, 4),
                                       depth=(1, 2, 1), key_dim=8, num_classes=10),
    # on (B, C, H, W) maps: 1 x 1 convs and BatchNorm; blocks of dw, ffn, cascaded group attention in 2 x 2
    # windows (each head its own q/k/v conv, feeding the next), dw, ffn; captured by torch.export
    "efficientvit": lambda: timm.create_model("efficientvit_m5", img_size=SIZE, embed_dim=(32, 48, 64),
                                              depth=(1, 2, 1), num_heads=(2, 3, 4), key_dim=(8, 8, 8),
                                              window_size=(2, 2, 2), num_classes=10),
    # 1 x 1 conv MLPs with a depthwise conv inside; attention on maps with talking heads as 1 x 1 convs, a
    # local conv on v, and, in its third stage, a strided conv before and an upsampling after
    "efficientformerv2": lambda: timm.create_model("efficientformerv2_s1", img_size=SIZE, depths=(1, 1, 2, 2),
                                                   embed_dims=(16, 32, 64, 128), num_classes=10),
    # re-parameterisable conv mixers (RepMixer) and conv MLPs; fastvit_t12 has no attention
    "fastvit": lambda: timm.create_model("fastvit_t12", layers=(1, 1, 2, 1), embed_dims=(16, 32, 64, 128),
                                         num_classes=10),
    # FastViT's attention stage: a conv position encoding, then attention on the flattened map
    "fastvit_sa": lambda: timm.create_model("fastvit_sa12", layers=(1, 1, 1, 2), embed_dims=(16, 32, 64, 128),
                                            num_classes=10),
}
STAGES = {  # (width, tokens) of each stage, and each block's stage
    "swin": ([(16, 256), (32, 64), (64, 16), (128, 4)], [0, 0, 1, 1, 2, 2, 3]),
    "pvt_v2": ([(16, 256), (32, 64), (32, 16), (64, 4)], [0, 0, 1, 1, 2, 3]),
    "levit": ([(32, 16), (48, 4), (64, 1)], [0, 1, 1, 1, 2, 2]),
    "efficientvit": ([(32, 16), (48, 4), (64, 1)], [0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2]),
    "efficientformerv2": ([(16, 256), (32, 64), (64, 16), (128, 4)], [0, 1, 2, 2, 3, 3]),
    "fastvit": ([(16, 256), (32, 64), (64, 16), (128, 4)], [0, 1, 2, 2, 3]),
    "fastvit_sa": ([(16, 256), (32, 64), (64, 16), (128, 4)], [0, 1, 2, 3, 3]),
}


@functools.cache
def _captured(name: str) -> Program:
    torch.manual_seed(0)
    model = STAGED[name]().eval()
    with torch.no_grad():  # LeViT starts its BatchNorms' weights at zero: every sublayer would add nothing
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.normal_(1, 0.2), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    return Program.from_module(model, ImageInput(SIZE, SIZE))


def program_of(name: str) -> Program:
    program = _captured(name)
    return dataclasses.replace(program, graph=copy.deepcopy(program.graph))


@pytest.fixture(params=list(STAGED))
def staged(request):
    return request.param


@pytest.fixture(params=[name for name in STAGED if name != "fastvit"])  # fastvit_t12 has no attention
def attending(request):
    return request.param


def images(n=4):
    return np.random.default_rng(0).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


def outputs(program):
    return program.run(images())


def heads(program, keep, score="l1"):
    params = dict(keep=keep, score=score, scope="layer", min_heads=1, data="calib")
    return HeadPrune().run(program, params, Ctx(params, images()))


def hidden(program, keep, round_to=1, score="l1"):
    params = dict(keep=keep, score=score, round_to=round_to, data="calib")
    return FfnPrune().run(program, params, Ctx(params, images()))


@pytest.mark.slow
def test_every_stage_is_recognised_with_its_width_and_blocks(staged):
    structure = program_of(staged).structure
    stages, of_block = STAGES[staged]
    assert [(s.dim, s.tokens) for s in structure.stages] == stages
    assert [b.stage for b in structure.blocks] == of_block
    text = structure.describe()
    assert "stage 1: width {}, {} tokens".format(*stages[1]) in text and text.count("  block ") == structure.depth


def pruned(program, keep, round_to=1):
    """Heads (where the model has attention) and hidden units, `keep` of each."""
    if any(b.attn for b in program.structure.blocks):
        program = heads(program, keep)
    return hidden(program, keep, round_to)


@pytest.mark.slow
def test_keep_1_leaves_the_outputs_bit_identical(staged):
    program = program_of(staged)
    assert torch.equal(outputs(pruned(program, 1.0)), outputs(program))


def test_head_prune_on_a_model_with_no_attention_says_so():
    with pytest.raises(SpecError, match="keep: .*no attention heads to remove: its blocks mix tokens by convolution"):
        heads(program_of("fastvit"), 0.5)


@pytest.mark.parametrize("score", ["l1", "taylor"])  # taylor: Swin's windows are rows of their own
def test_removing_heads_zeroed_first_changes_the_outputs_by_under_1e_5(attending, score):
    program = program_of(attending)
    attending = [b for b in program.structure.blocks if b.attn]  # LeViT downsamples by attention, then an MLP
    zero_heads(program, {b.index: list(range(b.attn.num_heads // 2)) for b in attending})
    reference = outputs(program)
    pruned = heads(program, 0.5, score)
    assert [b.attn.num_heads for b in pruned.structure.blocks if b.attn] == [
        b.attn.num_heads - b.attn.num_heads // 2 for b in attending]
    assert (outputs(pruned) - reference).abs().max() < 1e-5


@pytest.mark.parametrize("score", ["l1", "taylor", "activation"])
def test_removing_units_zeroed_first_changes_the_outputs_by_under_1e_5(staged, score):
    program = program_of(staged)
    zeroed = {b.index: list(range(0, b.mlp.hidden, 2)) for b in program.structure.blocks}
    zero_hidden(program, zeroed)
    _zero_batchnorms_after_fc1(program, zeroed)
    reference = outputs(program)
    pruned = hidden(program, 0.5, score=score)
    assert [b.mlp.hidden for b in pruned.structure.blocks] == [b.mlp.hidden // 2 for b in program.structure.blocks]
    assert (outputs(pruned) - reference).abs().max() < 1e-5


def test_levits_batchnorms_keep_the_statistics_of_the_kept_heads_and_units():
    program = program_of("levit")
    pruned = hidden(heads(program, 0.5), 0.5)
    qkv = pruned.graph.get_submodule("stages.0.blocks.0.attn.qkv.bn")
    before = program.graph.get_submodule("stages.0.blocks.0.attn.qkv.bn")
    assert qkv.num_features == qkv.running_mean.shape[0] == before.num_features // 2
    assert all(any(torch.equal(m, v) for v in before.running_mean) for m in qkv.running_mean)  # sliced, not reset
    assert pruned.graph.get_submodule("stages.0.blocks.0.mlp.ln1.bn").num_features == \
        pruned.structure.blocks[0].mlp.hidden


def test_efficientvits_removed_heads_leave_with_their_convs_and_the_cascade_skips_them():
    program = program_of("efficientvit")
    attn = "stages.1.blocks.0.mixer.m.attn"
    block = next(b for b in program.structure.blocks if b.attn and b.attn.proj.startswith(attn))
    assert block.attn.qkv == tuple(f"{attn}.qkvs.{h}.conv" for h in range(3)) and len(block.attn.heads_out) == 3
    zero_heads(program, {block.index: [1]})
    reference = outputs(program)
    params = dict(keep=[1 if b is not block else 2 / 3 for b in program.structure.blocks], score="l1",
                  scope="layer", min_heads=1, data=None)
    two = HeadPrune().run(program, params, Ctx(params))
    names = dict(two.graph.named_modules())
    assert f"{attn}.qkvs.0.conv" in names and f"{attn}.qkvs.2.conv" in names
    assert f"{attn}.qkvs.1.conv" not in names and f"{attn}.dws.1.conv" not in names  # head 1 went whole
    assert names[f"{attn}.proj.1.conv"].in_channels == 2 * block.attn.head_dim
    # head 2 now reads its own slice of the input alone: exactly what it read when head 1 gave zeros
    assert (outputs(two) - reference).abs().max() < 1e-5


def test_efficientformerv2s_local_v_conv_talking_heads_and_bias_keep_the_kept_heads():
    program = program_of("efficientformerv2")
    pruned = heads(program, 0.5)
    attn = "stages.2.blocks.0.token_mixer"
    before, after = program.structure.blocks[2].attn, pruned.structure.blocks[2].attn
    assert (before.num_heads, after.num_heads) == (8, 4)
    kept = after.num_heads * after.head_dim
    assert pruned.graph.get_submodule(f"{attn}.v.bn").num_features == kept
    local = pruned.graph.get_submodule(f"{attn}.v_local.conv")
    assert local.in_channels == local.out_channels == local.groups == kept
    assert pruned.graph.get_submodule(f"{attn}.talking_head1").weight.shape[:2] == (4, 4)
    assert getattr(pruned.graph.get_submodule(attn), "attention_bias").shape[0] == 4
    assert pruned.graph.get_submodule(f"{attn}.q.conv").out_channels == 4 * 32  # 4 heads of key_dim 32


def test_efficientformer_v1_is_recognised_from_its_first_stage_and_pruned_through_maps_and_tokens(tmp_path):
    """Its stages run on maps, pooling then a 1 x 1 conv MLP; its last stage flattens them to (B, N, C) tokens
    mid-stage for attention. Its attention bias is made for 224 x 224."""
    torch.manual_seed(0)
    model = timm.create_model("efficientformer_l1", depths=(1, 1, 1, 2), embed_dims=(16, 16, 32, 32), num_vit=1,
                              num_classes=10).eval()
    program = Program.from_module(model, ImageInput(224, 224))
    structure = program.structure
    assert [(s.dim, s.tokens, s.blocks) for s in structure.stages] == [
        (16, 3136, (0, 1)), (16, 784, (1, 2)), (32, 196, (2, 3)), (32, 49, (3, 5))]
    assert [bool(b.attn) for b in structure.blocks] == [False, False, False, False, True]
    zero_heads(program, {4: [0, 1, 2, 3]})
    zero_hidden(program, {b.index: list(range(0, b.mlp.hidden, 2)) for b in structure.blocks})
    _zero_batchnorms_after_fc1(program, {b.index: list(range(0, b.mlp.hidden, 2)) for b in structure.blocks})
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    reference = program.run(x)
    small = hidden(heads(program, 0.5), 0.5)
    assert small.structure.blocks[4].attn.num_heads == 4 and small.structure.blocks[0].mlp.hidden == 32
    assert (small.run(x) - reference).abs().max() < 1e-5
    export_onnx(small, tmp_path / "model.onnx", opset=17)
    np.testing.assert_allclose(session(tmp_path / "model.onnx")(x[:1]), small.run(x[:1]), atol=1e-4)


def test_explain_shows_the_conv_mixers_of_a_block():
    text = program_of("efficientvit").structure.describe()
    assert "block 1: attn 2x16, mlp 64, 1 conv mixer, 16 tokens" in text


def _zero_batchnorms_after_fc1(program, units_per_block):
    """LeViT's fc1 is Linear then BatchNorm: a zeroed unit's BatchNorm must give 0 too for its
    activation to be 0 (what the activation score sees), not only its fc2 column."""
    with torch.no_grad():
        for index, units in units_per_block.items():
            mlp = program.structure.blocks[index].mlp
            owner = mlp.fc1.rpartition(".")[0]
            for name, m in program.graph.named_modules():
                if (name.startswith(f"{owner}.") and isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                        and m.num_features == mlp.hidden):
                    m.bias[units], m.running_mean[units] = 0, 0


def test_pvt_v2s_depthwise_conv_keeps_the_channels_of_the_kept_units():
    pruned = hidden(program_of("pvt_v2"), 0.5)
    conv = pruned.graph.get_submodule("stages.0.blocks.0.mlp.dwconv")
    assert conv.in_channels == conv.out_channels == conv.groups == pruned.structure.blocks[0].mlp.hidden == 64


def test_skipping_a_block_inside_a_stage_keeps_every_downsampling(staged):
    program = program_of(staged)
    block = next(s.blocks[0] for s in program.structure.stages if s.blocks[1] - s.blocks[0] > 1)
    params = dict(attn=(), mlp=(), blocks=(block,), count=None, part="attn", score="residual", data=None)
    skipped = BlockSkip().run(program, params, Ctx(params, images()))
    assert [s.dim for s in skipped.structure.stages] == [s.dim for s in program.structure.stages]
    assert skipped.structure.depth == program.structure.depth - 1
    assert outputs(skipped).shape == (4, 10)


@pytest.mark.slow
def test_the_pruned_model_exports_to_onnx_with_parity(staged, tmp_path):
    program = pruned(program_of(staged), 0.5, round_to=8)
    export_onnx(program, tmp_path / "model.onnx", opset=17)
    x = images(1)
    np.testing.assert_allclose(session(tmp_path / "model.onnx")(x), program.run(x), atol=1e-4)


@pytest.mark.slow
def test_the_pruned_model_converts_to_tflite_with_parity(staged):
    from ai_edge_litert.interpreter import Interpreter

    from evc.targets.tflite import convert

    program = pruned(program_of(staged), 0.5, round_to=8)
    run = Interpreter(model_content=convert(program)).get_signature_runner()
    x = images(1)
    (y,) = run(input=x).values()
    np.testing.assert_allclose(y, program.run(x), atol=1e-4)


@pytest.mark.parametrize("token_pass, params", [(PatchSlim, dict(keep=[1, 0.5, 0.5, 0.5, 0.5, 0.5], fuse=False,
                                                                  score="mean_attention", search=None)),
                                                (TokenMerge, dict(r=2, proportional=True))])
def test_token_passes_refuse_a_model_in_stages_saying_why(token_pass, params):
    program = program_of("pvt_v2")
    with pytest.raises(SpecError, match="the model has 4 stages of widths 16, 32, 32, 64: token passes"):
        token_pass().run(program, params, Ctx(params, images()))


def test_a_cnn_is_refused_naming_what_was_looked_for():
    program = Program.from_module(timm.create_model("resnet18", num_classes=10).eval(), ImageInput(SIZE, SIZE))
    assert program.structure is None
    with pytest.raises(RecognitionError, match="the residual blocks after node 'conv1' hold no attention "
                                               "\\(a softmax\\) and no MLP .*: a convolutional network"):
        program.require_structure("head_prune")
    assert program.run(images(1)).shape == (1, 10)  # it still runs, and lowers, uncompressed


def test_swins_shift_mask_is_not_taken_for_a_bias_per_head_even_with_one_head():
    program = program_of("swin")
    pruned = heads(program, 0.5)  # stage 0 and 1 keep one head; blocks 1 and 3 are shifted
    for block in pruned.structure.blocks:
        assert [b.rpartition(".")[2] for b in block.attn.biases] == ["attention_bias"]
