import importlib.util
import json
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from evc.errors import InputError
from evc.ir.recognise import RecognitionError, recognise
from evc.ir.trace import trace

PLAIN_VIT = Path(__file__).parents[2] / "examples" / "plain_vit" / "vit.py"


def load_plain_vit():
    spec = importlib.util.spec_from_file_location("plain_vit", PLAIN_VIT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timm_structure(name, size=32, **kwargs):
    model = timm.create_model(name, pretrained=False, img_size=size, **kwargs)
    return recognise(trace(model, torch.randn(1, 3, size, size)))


def plain_structure(**kwargs):
    model = load_plain_vit().plain_vit_tiny(**kwargs)
    return recognise(trace(model, torch.randn(1, 3, 32, 32)))


@pytest.fixture(scope="module")
def deit_tiny():
    return timm_structure("deit_tiny_patch16_224", size=224)


def test_deit_tiny_has_12_blocks_of_3_heads_and_768_hidden(deit_tiny):
    assert (deit_tiny.depth, deit_tiny.embed_dim) == (12, 192)
    blocks = {(b.attn.num_heads, b.attn.head_dim, b.mlp.hidden, b.tokens) for b in deit_tiny.blocks}
    assert blocks == {(3, 64, 768, 197)}


def test_deit_tiny_stem_and_head_are_named_by_module(deit_tiny):
    assert deit_tiny.patch_embed == "patch_embed.proj"
    assert (deit_tiny.patch_size, deit_tiny.grid) == ((16, 16), (14, 14))
    assert (deit_tiny.prefix_tokens, deit_tiny.pos_embed) == (("cls_token",), "pos_embed")
    assert (deit_tiny.norm, deit_tiny.pool) == ("norm", "token")
    assert (deit_tiny.head, deit_tiny.num_classes) == (("head",), 1000)


def test_deit_tiny_block_names_its_linears_and_sdpa(deit_tiny):
    block = deit_tiny.blocks[5]
    assert block.attn.qkv == ("blocks.5.attn.qkv",)
    assert block.attn.proj == "blocks.5.attn.proj"
    assert block.attn.score_node.startswith("scaled_dot_product_attention")
    assert (block.mlp.fc1, block.mlp.fc2) == ("blocks.5.mlp.fc1", "blocks.5.mlp.fc2")
    assert block.mlp.act_node == "blocks_5_mlp_act"


def test_deit_tiny_head_count_nodes_are_the_qkv_split_and_the_merge(deit_tiny):
    assert deit_tiny.blocks[0].attn.head_count_nodes == ("reshape", "reshape_1")


def test_block_nodes_are_disjoint_and_end_at_the_residual_add(deit_tiny):
    names = [n for b in deit_tiny.blocks for n in b.nodes]
    assert len(names) == len(set(names))
    assert all(b.nodes[-1].startswith("add") for b in deit_tiny.blocks)


def test_vit_small_has_6_heads_and_1536_hidden():
    structure = timm_structure("vit_small_patch16_224")
    assert (structure.depth, structure.embed_dim) == (12, 384)
    assert {(b.attn.num_heads, b.mlp.hidden, b.tokens) for b in structure.blocks} == {(6, 1536, 5)}


def test_distilled_deit_has_two_prefix_tokens_and_two_head_linears():
    structure = timm_structure("deit_tiny_distilled_patch16_224")
    assert structure.prefix_tokens == ("cls_token", "dist_token")
    assert structure.head == ("head", "head_dist")
    assert structure.blocks[0].tokens == 2 + 4


def test_vit_without_class_token_pools_by_average():
    structure = timm_structure("vit_tiny_patch16_224", class_token=False, global_pool="avg")
    assert (structure.prefix_tokens, structure.pool, structure.norm) == ((), "avg", "fc_norm")
    assert structure.blocks[0].tokens == 4


def test_timm_attention_without_fused_kernel_is_found_by_its_softmax():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32)
    for block in model.blocks:
        block.attn.fused_attn = False
    structure = recognise(trace(model, torch.randn(1, 3, 32, 32)))
    assert structure.blocks[0].attn.score_node == "softmax"
    assert structure.blocks[0].attn.num_heads == 3


def test_plain_vit_is_recognised_with_the_same_fields_as_timm_vit():
    plain = plain_structure()
    twin = timm_structure("vit_tiny_patch16_224", patch_size=4, depth=6, num_classes=10)

    def fields(s):
        blocks = [(b.attn.num_heads, b.attn.head_dim, b.mlp.hidden, b.tokens) for b in s.blocks]
        return s.depth, s.embed_dim, s.patch_size, s.grid, len(s.prefix_tokens), s.pool, s.num_classes, blocks

    assert fields(plain) == fields(twin)


def test_plain_vit_separate_q_k_v_are_each_split_by_heads():
    attn = plain_structure().blocks[0].attn
    assert attn.qkv == ("layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v")
    assert attn.proj == "layers.0.attn.out"
    assert attn.head_count_nodes == ("view", "view_1", "view_2")
    assert attn.score_node == "softmax"


def test_structure_to_dict_is_json():
    data = json.loads(json.dumps(plain_structure().to_dict()))
    assert data["depth"] == 6
    assert data["blocks"][0]["mlp"]["hidden"] == 768


class SmallCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


def test_cnn_is_rejected_at_its_first_conv():
    with pytest.raises(RecognitionError, match="no residual add `x \\+ f\\(x\\)` after node 'conv': "
                                               "expected the blocks of a transformer") as error:
        recognise(trace(SmallCnn(), torch.randn(1, 3, 32, 32)))
    assert error.value.node == "conv"


class ReluAttention(nn.Module):
    """Linear attention: relu instead of softmax, which evc does not recognise."""

    def __init__(self, attn):
        super().__init__()
        self.inner = attn

    def forward(self, x):
        a = self.inner
        q, k, v = a.split_heads(a.q(x)), a.split_heads(a.k(x)), a.split_heads(a.v(x))
        weights = (q @ k.transpose(-2, -1) * a.scale).relu()
        return a.out((weights @ v).transpose(1, 2).flatten(2))


def test_attention_without_softmax_is_rejected_naming_its_projection():
    model = load_plain_vit().plain_vit_tiny()
    for layer in model.layers:
        layer.attn = ReluAttention(layer.attn)
    expected = ("block 0: the attention branch ending at node 'layers_0_attn_inner_out' "
                "has no softmax or scaled_dot_product_attention")
    with pytest.raises(RecognitionError, match=expected) as error:
        recognise(trace(model, torch.randn(1, 3, 32, 32)))
    assert error.value.node == "layers_0_attn_inner_out"


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_untraceable_model_is_an_input_error_naming_the_model():
    with pytest.raises(InputError, match="cannot trace model 'DataDependent': "):
        trace(DataDependent(), torch.randn(1, 3))


def test_model_failing_on_the_example_is_an_input_error_naming_the_node():
    with pytest.raises(InputError, match=r"model 'SmallCnn' fails at node 'conv' on an example input of shape \(1, 4,"):
        trace(SmallCnn(), torch.randn(1, 4, 32, 32))


def test_trace_records_a_shape_on_every_tensor_node():
    gm = trace(load_plain_vit().plain_vit_tiny(), torch.randn(2, 3, 32, 32))
    classifier = next(n for n in gm.graph.nodes if n.target == "classifier")
    assert tuple(classifier.meta["tensor_meta"].shape) == (2, 10)


def test_trace_keeps_only_the_image_input_of_timm_models():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32)
    gm = trace(model, torch.randn(1, 3, 32, 32))
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]


def test_traced_timm_model_computes_the_models_output():
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32).eval()
    images = torch.randn(2, 3, 32, 32)
    gm = trace(model, images)
    with torch.no_grad():
        torch.testing.assert_close(gm(images), model(images))


def _captured(name, **kwargs):
    model = timm.create_model(name, pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=10,
                              **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = trace(model, x[:1])
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-6)  # folding constants changes nothing in eval
    return gm, recognise(gm)


def test_beit_q_v_biases_become_the_qkv_linears_bias_and_its_relative_position_bias_a_buffer_per_head():
    gm, structure = _captured("beit_base_patch16_224", embed_dim=64, num_heads=4)
    attn = structure.blocks[0].attn
    assert attn.qkv == ("blocks.0.attn.qkv",) and gm.get_submodule("blocks.0.attn.qkv").bias.shape == (192,)
    assert attn.biases == ("blocks.0.attn.attention_bias",)
    assert gm.get_buffer("blocks.0.attn.attention_bias").shape == (1, 4, 17, 17)
    assert (structure.prefix_tokens, structure.pool, structure.head) == (("cls_token",), "avg", ("head",))
    assert structure.blocks[0].fixed_tokens == ("blocks_0_attn_attention_bias",)


def test_eva02_has_a_gated_mlp_packed_in_one_linear_and_rotary_positions_fixed():
    gm, structure = _captured("eva02_tiny_patch14_224", embed_dim=64, num_heads=4)
    mlp = structure.blocks[0].mlp
    assert (mlp.packed, mlp.gate, mlp.hidden) == (2, None, 170)
    assert gm.get_submodule(mlp.fc1).out_features == 2 * 170
    assert structure.blocks[0].attn.qkv == ("blocks.0.attn.qkv",)
    assert structure.blocks[0].fixed_tokens  # the rotary embedding's sin and cos, one row per patch
    assert "gated mlp 170" in structure.describe()


def test_a_swiglu_mlp_with_two_input_projections_is_one_gated_mlp():
    from timm.layers import SwiGLU

    model = load_plain_vit().plain_vit_tiny(depth=2)
    for layer in model.layers:
        layer.ffn = SwiGLU(192, 256)
    structure = recognise(trace(model.eval(), torch.randn(1, 3, 32, 32)))
    mlp = structure.blocks[0].mlp
    assert (mlp.fc1, mlp.gate, mlp.fc2, mlp.hidden) == ("layers.0.ffn.fc1_x", "layers.0.ffn.fc1_g",
                                                         "layers.0.ffn.fc2", 256)


def test_cait_talking_heads_are_mixers_and_its_class_attention_blocks_are_blocks_of_the_class_token():
    gm, structure = _captured("cait_xxs24_224", embed_dim=64, num_heads=4)
    assert structure.depth == 4
    sa, ca = structure.blocks[0], structure.blocks[2]
    assert sa.attn.mixers == ("blocks.0.attn.proj_l", "blocks.0.attn.proj_w") and sa.attn.qkv == ("blocks.0.attn.qkv",)
    assert (sa.class_attention, sa.tokens) == (False, 16)
    assert ca.class_attention and ca.tokens == 1
    assert ca.attn.qkv == ("blocks_token_only.0.attn.q", "blocks_token_only.0.attn.k", "blocks_token_only.0.attn.v")
    assert (structure.prefix_tokens, structure.pool, structure.head, structure.num_classes) == ((), "token",
                                                                                             ("head",), 10)
    assert "class attn 4x16" in structure.describe() and "heads mixed by" in structure.describe()


def test_a_saved_program_loads_with_every_node_its_structure_names(tmp_path):
    from evc.ir.program import Program
    from evc.spec.plan import ImageInput

    torch.manual_seed(0)  # Swin v2: capture leaves gaps in its node numbering that a reload would close
    model = timm.create_model("swinv2_tiny_window8_256", img_size=64, window_size=4, embed_dim=16, depths=(1, 1),
                              num_heads=(1, 2), num_classes=10)
    program = Program.from_module(model, ImageInput(64, 64))
    program.save(tmp_path / "program.pt")
    loaded = Program.load(tmp_path / "program.pt")
    assert [n.name for n in loaded.graph.graph.nodes] == [n.name for n in program.graph.graph.nodes]
    assert {name for block in program.structure.blocks for name in block.nodes} <= {
        n.name for n in loaded.graph.graph.nodes}
