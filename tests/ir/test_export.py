"""Models torch.fx cannot trace, captured by torch.export and written back in torch.fx's vocabulary."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evc.errors import InputError
from evc.ir.trace import trace
from tests.families import einops_vit, hf_vit


@pytest.fixture(scope="module")
def captured():
    torch.manual_seed(0)
    model = hf_vit("sdpa").eval()
    return model, trace(model, torch.zeros(1, 3, 32, 32))


@pytest.mark.slow
def test_a_hf_vit_runs_any_batch_with_the_outputs_of_the_model(captured):
    model, gm = captured
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_its_layers_are_modules_under_the_models_own_names(captured):
    _, gm = captured
    modules = dict(gm.named_modules())
    assert isinstance(modules["vit.layers.0.attention.q_proj"], nn.Linear)
    assert isinstance(modules["vit.embeddings.patch_embeddings.projection"], nn.Conv2d)
    assert isinstance(modules["vit.layernorm"], nn.LayerNorm)


@pytest.mark.slow
def test_no_aten_op_and_no_empty_attention_mask_is_left(captured):
    _, gm = captured
    assert "torch.ops.aten" not in gm.code
    sdpa = [n for n in gm.graph.nodes if n.target is torch.nn.functional.scaled_dot_product_attention]
    assert len(sdpa) == 4 and all(len(n.args) == 3 and "attn_mask" not in n.kwargs for n in sdpa)


def captured_exactly(model: nn.Module, size: int):
    """`model` captured on one image, computing exactly its outputs on a batch of two."""
    gm = trace(model.eval(), torch.zeros(1, 3, size, size))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    return gm


def test_an_einops_vit_is_captured_with_its_linear_patch_embedding():
    torch.manual_seed(0)
    gm = captured_exactly(einops_vit(), 32)
    assert isinstance(gm.get_submodule("to_patch_embedding.2"), nn.Linear)


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_a_model_neither_capture_can_take_gives_both_reasons():
    with pytest.raises(InputError, match=r"cannot trace model 'DataDependent': .*; torch\.export: "):
        trace(DataDependent(), torch.randn(1, 3))


class Vocabulary(nn.Module):
    """Layers and functions whose ATen spellings export records differently from torch.fx."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding="same")
        self.norm = nn.GroupNorm(2, 8)

    def forward(self, x):
        if x.shape[-1] < 4:  # torch.fx cannot branch on a size; torch.export reads it
            return x
        y = F.silu(self.norm(self.conv(x)), inplace=True)
        y = F.pad(F.interpolate(y, scale_factor=2, mode="bilinear"), (1, 1, 1, 1))
        return F.adaptive_avg_pool1d(y.flatten(2), 4).sum(-1)


def test_padded_convs_group_norms_in_place_activations_and_resizing_are_written_as_torch_fx_records_them():
    torch.manual_seed(0)
    gm = captured_exactly(Vocabulary(), 8)
    assert "torch.ops.aten" not in gm.code
    assert isinstance(gm.get_submodule("conv"), nn.Conv2d) and isinstance(gm.get_submodule("norm"), nn.GroupNorm)
