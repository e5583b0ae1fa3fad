"""nn.MultiheadAttention traced as plain ops: same outputs, heads visible, the user's model untouched."""

import pytest
import torch
from torch import nn

from evc.errors import InputError
from evc.ir.attention import traceable_attention
from evc.ir.recognise import recognise
from evc.ir.trace import trace
from tests.families import torchvision_vit


def test_torchvision_vit_traces_to_its_own_outputs_with_heads_and_linears_visible():
    torch.manual_seed(0)
    model = torchvision_vit(num_layers=2, num_heads=3, hidden_dim=48).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = trace(model, x)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    attn = recognise(gm).blocks[1].attn
    assert (attn.num_heads, attn.head_dim) == (3, 16)
    assert attn.qkv == ("encoder.layers.encoder_layer_1.self_attention.qkv",)
    assert attn.proj == "encoder.layers.encoder_layer_1.self_attention.proj"


def test_the_users_model_keeps_its_multihead_attention():
    model = torchvision_vit(num_layers=2)
    trace(model, torch.randn(1, 3, 32, 32))
    assert isinstance(model.encoder.layers[0].self_attention, nn.MultiheadAttention)


class CrossAttention(nn.Module):
    """An attention-pool head: a learned query attends to the tokens (Hugging Face SigLIP's head)."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.probe = nn.Parameter(torch.randn(1, 1, 16))

    def forward(self, x):
        return self.mha(self.probe.repeat(x.shape[0], 1, 1), x, x)[0]


def test_cross_attention_traces_into_a_q_linear_and_a_kv_linear_with_the_same_outputs():
    torch.manual_seed(0)
    model, x = CrossAttention().eval(), torch.randn(3, 5, 16)
    gm = trace(model, x[:1])
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    linears = {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    assert {name: layer.out_features for name, layer in linears.items() if name != "mha.proj"} == {
        "mha.q": 16, "mha.kv": 32}


class TwoSources(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x.flip(1))[0]


def test_a_value_that_is_not_the_key_is_an_input_error_naming_the_module():
    with pytest.raises(InputError, match="nn.MultiheadAttention 'mha' is called with a value that is not its key"):
        trace(TwoSources(), torch.randn(1, 5, 16))


def test_sequence_first_attention_with_weights_returns_what_multihead_attention_does():
    mha = nn.MultiheadAttention(16, 4).eval()
    x = torch.randn(5, 2, 16)
    out, weights = traceable_attention(nn.ModuleDict({"mha": mha}))["mha"](x, x, x)
    expected, expected_weights = mha(x, x, x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights, expected_weights)
