"""Transformers no earlier issue named (issue 25's table), each small, built by its family's own library.

    model, size, output = ZOO["samvit"]()     # eval mode, random weights; a 1×3×size×size image runs it
    Program.from_module(model, image, output)  # `output`: the key a spec's `output = "..."` would name, or None
    @pytest.mark.parametrize("name", params(slow={"mobilevitv2"}))

Each builder returns the model as a user brings it: timm's create_model (or the family's own class
with a reduced config where create_model takes no depths), or a Hugging Face class on a tiny config.
A model returning a ModelOutput keeps it; `output` says which of its tensors evc compresses, as the
spec would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from torch import nn

Built = tuple[nn.Module, int, str | None]  # model in eval mode, image size, output key


def _timm(name: str, size: int, **kwargs) -> Built:
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **kwargs).eval(), size, None


def _stages(name: str, size: int = 64, **kwargs) -> Built:
    """A four-stage timm model, one block per stage, narrow."""
    return _timm(name, size, depths=(1, 1, 1, 1), **kwargs)


def _vit(name: str, **kwargs) -> Built:
    """A timm ViT variant at 32×32, patches of 8, two blocks of width 64 and four heads."""
    return _timm(name, 32, img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4, **kwargs)


def _mvitv2() -> Built:
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    torch.manual_seed(0)
    cfg = MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=(16, 32, 48, 64), num_heads=(1, 2, 3, 4))
    return MultiScaleVit(cfg, img_size=(64, 64), num_classes=10).eval(), 64, None


def _maxvit() -> Built:
    from timm.models.maxxvit import MaxxVit, model_cfgs

    torch.manual_seed(0)
    cfg = dataclasses.replace(model_cfgs["maxvit_nano_rw"], embed_dim=(16, 32, 48, 64), depths=(1, 1, 1, 1),
                              stem_width=(8, 16))
    cfg = dataclasses.replace(cfg, transformer_cfg=dataclasses.replace(cfg.transformer_cfg, dim_head=8))
    return MaxxVit(cfg, img_size=64, num_classes=10).eval(), 64, None


def _metaformer(mixers, norms, **kwargs) -> Built:
    """timm's MetaFormer as its registered variants build it (token mixers and norms named per stage; no
    mixers: pooling), one block per stage."""
    from timm.models import metaformer

    torch.manual_seed(0)
    kwargs["norm_layers"] = [getattr(metaformer, name) for name in norms]
    if mixers:
        kwargs["token_mixers"] = [getattr(metaformer, name) for name in mixers]
    return metaformer.MetaFormer(depths=(1, 1, 1, 1), dims=(16, 32, 64, 64), num_classes=10, **kwargs).eval(), 64, None


def _gcvit() -> Built:
    from timm.models.gcvit import GlobalContextVit

    torch.manual_seed(0)
    return GlobalContextVit(img_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 4),
                            num_classes=10).eval(), 64, None


def _hf(model: str, config: str, size: int, output: str | None, **kwargs) -> Built:
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, model)(getattr(transformers, config)(**kwargs)).eval(), size, output


ZOO: dict[str, Callable[[], Built]] = {
    # two attentions and two MLPs side by side in each block
    "parallel_vit": lambda: _vit("vit_small_patch16_18x2_224"),
    # cross-covariance attention (heads over channels), class-attention blocks
    "xcit": lambda: _timm("xcit_nano_12_p16_224", 32, img_size=32, depth=2),
    # spatial window attention and channel attention in turn
    "davit": lambda: _stages("davit_tiny", embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), window_size=2),
    # conv position encodings, factorized attention with conv relative positions
    "coat_lite": lambda: _timm("coat_lite_tiny", 64, img_size=64, embed_dims=(16, 32, 48, 64),
                               serial_depths=(1, 1, 1, 1)),
    # locally-grouped and global sub-sampled attention
    "twins_svt": lambda: _stages("twins_svt_small", img_size=64, embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4),
                                 wss=(2, 2, 2, 2)),
    # PVT attention with conv position encodings
    "twins_pcpvt": lambda: _stages("twins_pcpvt_small", img_size=64, embed_dims=(16, 32, 48, 64),
                                   num_heads=(1, 2, 3, 4)),
    # SAM's image encoder: windowed attention (heads folded into the batch), decomposed relative positions
    "samvit": lambda: _timm("samvit_base_patch16", 64, img_size=64, patch_size=8, depth=2, embed_dim=64, num_heads=4,
                            window_size=4, global_attn_indexes=(1,), neck_chans=32),
    # pooling attention
    "mvitv2": _mvitv2,
    # mask-unit attention over an unrolled token order
    "hiera": lambda: _timm("hiera_tiny_224", 64, img_size=(64, 64), embed_dim=16, stages=(1, 1, 1, 1)),
    # conv encoders, split depthwise convs, cross-covariance attention on maps
    "edgenext": lambda: _stages("edgenext_xx_small", dims=(16, 32, 48, 64)),
    # MBConv, block and grid attention
    "maxvit": _maxvit,
    # MBConv stage, then windowed attention with a conv between attention and MLP
    "tiny_vit": lambda: _stages("tiny_vit_5m_224", embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4),
                                window_sizes=(2, 2, 2, 2)),
    # cosine attention, continuous position bias, post-norm
    "swinv2": lambda: _timm("swinv2_tiny_window8_256", 64, img_size=64, window_size=4, embed_dim=16, depths=(1, 1),
                            num_heads=(1, 2)),
    "hf_swinv2": lambda: _hf("Swinv2Model", "Swinv2Config", 32, None, image_size=32, patch_size=4, embed_dim=16,
                             depths=[1, 1], num_heads=[1, 2], window_size=4),
    # MetaFormers: separable-conv mixers, attention in the late stages, res-scales
    # (convformer_s18, caformer_s18 and poolformerv2_s12 fix their depths, so their kwargs are spelled here)
    "convformer": lambda: _metaformer(("SepConv",) * 4, ("LayerNorm2dNoBias",) * 4),
    "caformer": lambda: _metaformer(("SepConv",) * 2 + ("Attention",) * 2,
                                    ("LayerNorm2dNoBias",) * 2 + ("LayerNormNoBias",) * 2),
    "poolformerv2": lambda: _metaformer(None, ("GroupNorm1NoBias",) * 4, use_mlp_head=False),
    # ReLU linear attention with multi-scale aggregation
    "efficientvit_b": lambda: _timm("efficientvit_b0", 64, widths=(8, 16, 32, 48, 64), depths=(1, 1, 1, 1, 1),
                                    head_dim=16, head_widths=(128, 160)),
    # separable linear attention, MLPs of 1×1 convs
    "mobilevitv2": lambda: _timm("mobilevitv2_050", 64),
    # attention-pool (MAP) head
    "siglip": lambda: _vit("vit_base_patch16_siglip_256"),
    "hf_siglip": lambda: _hf("SiglipVisionModel", "SiglipVisionConfig", 32, None, hidden_size=64,
                             intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                             patch_size=8),
    # dense outputs: a depth map, a segmentation map, a backbone's feature map
    "hf_dpt": lambda: _hf("DPTForDepthEstimation", "DPTConfig", 32, None, hidden_size=32, num_hidden_layers=4,
                          num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8, is_hybrid=False,
                          backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                          reassemble_factors=[4, 2, 1, 0.5], fusion_hidden_size=16, head_hidden_size=8),
    "hf_segformer": lambda: _hf("SegformerForSemanticSegmentation", "SegformerConfig", 64, "logits",
                                depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4],
                                decoder_hidden_size=32, num_labels=5),
    "features_only": lambda: _timm("vit_tiny_patch16_224", 32, img_size=32, patch_size=8, depth=2, embed_dim=64,
                                   num_heads=4, features_only=True, out_indices=(1,)),
    # relative positions: shared relative-position MLP, gated positional self-attention, global context
    "vit_srelpos": lambda: _vit("vit_srelpos_small_patch16_224"),
    "convit": lambda: _timm("convit_tiny", 32, img_size=32, patch_size=8, depth=2, embed_dim=16, num_heads=4,
                            local_up_to_layer=1),  # embed_dim is per head: 64 wide
    "gcvit": _gcvit,
}


def params(*, slow: frozenset[str] = frozenset()) -> list:
    """pytest params over ZOO's names, those in `slow` marked slow."""
    return [pytest.param(name, marks=pytest.mark.slow) if name in slow else name for name in ZOO]
