"""Model families every structural pass is tested on, and helpers to zero units before pruning them."""

import copy
import dataclasses
import functools
import sys

import numpy as np
import pytest
import timm
import torch

from evc.ir.program import Program
from evc.passes.surgery import head_rows, hidden_rows
from evc.spec.plan import ImageInput
from tests import families
from tests.conftest import ROOT

SIZE = 32

FAMILIES = {
    # class token, 3 heads of 64
    "deit_tiny": lambda: timm.create_model("deit_tiny_patch16_224", img_size=SIZE, patch_size=8),
    # class token, 6 heads of 64
    "vit_small": lambda: timm.create_model("vit_small_patch16_224", img_size=SIZE, patch_size=8, depth=6),
    # class and distillation tokens, two heads
    "deit_tiny_distilled": lambda: timm.create_model("deit_tiny_distilled_patch16_224", img_size=SIZE,
                                                      patch_size=8, depth=6),
    # global average pooling, no class token
    "vit_gap": lambda: timm.create_model("vit_tiny_patch16_224", img_size=SIZE, patch_size=8, depth=6,
                                         class_token=False, global_pool="avg"),
    # plain PyTorch, no timm code
    "plain_vit": lambda: _plain_vit(),
    # plain PyTorch reading its widths from x.shape, as older timm did
    "shape_vit": lambda: families.shape_vit(depth=4),
    # torchvision's VisionTransformer: nn.MultiheadAttention inside
    "torchvision_vit": lambda: families.torchvision_vit(),
    # Hugging Face transformers, captured by torch.export: eager and sdpa attention, distilled DeiT
    "hf_vit": lambda: families.hf_vit("eager"),
    "hf_vit_sdpa": lambda: families.hf_vit("sdpa"),
    "hf_deit_distilled": lambda: families.hf_deit_distilled(),
    # vit-pytorch's style: einops, a Linear patch embedding, q/k/v chunked from one Linear
    "einops_vit": lambda: families.einops_vit(),
    # timm's BEiT: q/v biases passed to F.linear, a relative position bias per head, average pooling
    "beit": lambda: timm.create_model("beit_base_patch16_224", img_size=SIZE, patch_size=8, depth=4, embed_dim=64,
                                      num_heads=4, num_classes=10),
    # timm's EVA-02: SwiGLU packed in one Linear, rotary embeddings, q/k/v biases passed to F.linear
    "eva02": lambda: timm.create_model("eva02_tiny_patch14_224", img_size=SIZE, patch_size=8, depth=4,
                                       embed_dim=64, num_heads=4, num_classes=10),
    # timm's CaiT: talking heads in self-attention, then class-attention blocks for a late class token
    "cait": lambda: timm.create_model("cait_xxs24_224", img_size=SIZE, patch_size=8, depth=2, embed_dim=64,
                                      num_heads=4, num_classes=10),
}


def _plain_vit():
    sys.path.insert(0, str(ROOT / "examples" / "plain_vit"))
    from vit import plain_vit_tiny

    return plain_vit_tiny(depth=4, img_size=SIZE)


def program_of(family: str) -> Program:
    """A fresh copy of the family's Program: tests change its weights in place."""
    program = _captured(family)
    return dataclasses.replace(program, graph=copy.deepcopy(program.graph))


@functools.cache
def _captured(family: str) -> Program:
    torch.manual_seed(0)
    return Program.from_module(FAMILIES[family]().eval(), ImageInput(SIZE, SIZE))


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


class Ctx:
    """A PassContext for calling a pass directly: per-layer values and images."""

    def __init__(self, params, images=None):
        self.params, self._images = params, images
        self.found, self.warnings = {}, []

    def per_layer(self, key, depth):
        value = self.params[key]
        return tuple(value) if isinstance(value, (list, tuple)) else (value,) * depth

    def images(self, name):
        return self._images

    def report(self, key, value):
        self.found[key] = value

    def warn(self, message):
        self.warnings.append(message)

    def error(self, key, message):
        from evc.errors import SpecError

        return SpecError.at("test.evc", "", None, f"{key}: {message}")


def images(n=8):
    return np.random.default_rng(0).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


def zero_heads(program: Program, heads_per_block: dict[int, list[int]]) -> None:
    """Zero those heads' q/k/v rows and projection columns: they then contribute nothing."""
    gm = program.graph
    with torch.no_grad():
        for index, heads in heads_per_block.items():
            attn = program.structure.blocks[index].attn
            for linear in attn.qkv:
                rows = head_rows(gm, attn, linear, "test")[heads].ravel()
                rows = rows[rows >= 0]  # cascaded attention: -1 marks another head's projection
                module = gm.get_submodule(linear)
                module.weight[rows] = 0
                if module.bias is not None:
                    module.bias[rows] = 0
                if attn.heads_out and len(rows):  # its output feeds the next head: its BatchNorm gives 0 too
                    for m in gm.get_submodule(linear.rpartition(".")[0]).modules():
                        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                            m.weight[rows], m.bias[rows], m.running_mean[rows] = 0, 0, 0
            proj = gm.get_submodule(attn.proj)
            for h in heads:
                proj.weight[:, h * attn.head_dim:(h + 1) * attn.head_dim] = 0
            for mixer in attn.mixers:  # talking heads: nothing of a zeroed head is mixed into the others
                gm.get_submodule(mixer).weight[:, heads] = 0


def zero_hidden(program: Program, units_per_block: dict[int, list[int]]) -> None:
    """Zero those hidden units' input rows (a gated MLP's too) and fc2 columns: GELU(0) = 0, and
    a gate times 0 is 0, so they contribute nothing."""
    gm = program.graph
    with torch.no_grad():
        for index, units in units_per_block.items():
            mlp = program.structure.blocks[index].mlp
            for name, rows in hidden_rows(mlp).items():
                linear = gm.get_submodule(name)
                linear.weight[rows[:, units].ravel()] = 0
                if linear.bias is not None:
                    linear.bias[rows[:, units].ravel()] = 0
            gm.get_submodule(mlp.fc2).weight[:, units] = 0


def outputs(program: Program, x=None):
    x = torch.from_numpy(images(4)) if x is None else x
    return program.run(x)
