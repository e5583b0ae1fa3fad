"""Torch-Pruning as the baseline for evc's structural pruning of a timm ViT.

    from torch_pruning_baseline import export_onnx, prune_with_torch_pruning
    result = prune_with_torch_pruning(model, heads_to_remove={0: [0, 1, 2]},
                                      hidden_to_remove={0: list(range(768))})
    ok, message = export_onnx(result.model, "pruned.onnx")
    pruned = prune_as_documented(as_example_builds(model), example_input, ratio=0.5)   # any timm model

    .venv/bin/python benchmarks/torch_pruning_baseline.py   # self-check on deit_small

The caller chooses which heads and MLP hidden units go; Torch-Pruning's
DependencyGraph finds and slices every layer coupled to them, as its
examples/transformers/prune_timm_vit.py does. Its importance criteria and
MetaPruner are left out so that both tools remove the same units.

`prune_as_documented` is Torch-Pruning left to choose, on any timm model, as
its examples/timm_models/prune_timm_models.py configures it.
Torch-Pruning is a benchmark-only dependency (benchmarks/requirements.txt).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch_pruning as tp
from timm.models.vision_transformer import Attention
from torch import nn


@dataclass
class TorchPruningResult:
    model: nn.Module
    seconds: float  # dependency graph build + pruning + head-count rewrite
    params: int
    needed_patch: bool
    patch_note: str


def prune_with_torch_pruning(
    model: nn.Module,
    heads_to_remove: dict[int, list[int]],
    hidden_to_remove: dict[int, list[int]],
) -> TorchPruningResult:
    """Remove the given heads and MLP hidden units of each block, in place, as Torch-Pruning does."""
    example_input = torch.zeros(1, 3, *model.patch_embed.img_size)
    start = time.perf_counter()
    graph = tp.DependencyGraph().build_dependency(model, example_input, verbose=False)
    for index, heads in heads_to_remove.items():
        if heads:
            qkv = model.blocks[index].attn.qkv
            rows = qkv_rows(model.blocks[index].attn, heads)
            graph.get_pruning_group(qkv, tp.prune_linear_out_channels, rows).prune()
    for index, hidden in hidden_to_remove.items():
        if hidden:
            fc1 = model.blocks[index].mlp.fc1
            graph.get_pruning_group(fc1, tp.prune_linear_out_channels, list(hidden)).prune()
    rewritten = rewrite_head_counts(model)
    seconds = time.perf_counter() - start
    note = f"set {', '.join(rewritten)} by hand on each pruned Attention; forward not replaced" if rewritten else "none"
    return TorchPruningResult(
        model=model,
        seconds=seconds,
        params=sum(p.numel() for p in model.parameters()),
        needed_patch=bool(rewritten),
        patch_note=note,
    )


def as_example_builds(model: nn.Module) -> nn.Module:
    """`model` with timm's attention unfused, as prune_timm_models.py builds it (TIMM_FUSED_ATTN=0)."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


def prune_as_documented(model: nn.Module, example_input: torch.Tensor, ratio: float) -> nn.Module:
    """Prune `model` in place as Torch-Pruning's examples/timm_models/prune_timm_models.py does: group
    magnitude importance, a uniform `ratio` of every prunable group's channels (the residual width
    included), round_to 8, the classifier's last Linear ignored, the heads of timm's ViT Attention given.

    Where the example replaces that Attention's forward (to reshape by the pruned width), timm 1.0
    reshapes by `attn_dim`, which is set here instead: the example's forward no longer takes the
    `attn_mask` that timm's blocks pass.
    """
    head = getattr(model, "head", None)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if isinstance(head, nn.Module) else []
    num_heads = {m.qkv: m.num_heads for m in model.modules() if isinstance(m, Attention)}
    pruner = tp.pruner.BasePruner(model, example_input, importance=tp.importance.GroupMagnitudeImportance(),
                                  global_pruning=False, iterative_steps=1, pruning_ratio=ratio,
                                  pruning_ratio_dict={}, num_heads=num_heads, ignored_layers=linears[-1:],
                                  round_to=8)
    for group in pruner.step(interactive=True):
        group.prune()
    for attn in model.modules():
        if isinstance(attn, Attention) and attn.qkv in num_heads:
            attn.num_heads = num_heads[attn.qkv]
            attn.head_dim = attn.qkv.out_features // (3 * attn.num_heads)
            attn.attn_dim = attn.num_heads * attn.head_dim
    return model


def qkv_rows(attn: Attention, heads: list[int]) -> list[int]:
    """Rows of timm's fused qkv Linear that belong to `heads`: its rows run [q|k|v] x heads x head_dim."""
    width = attn.num_heads * attn.head_dim
    return [part * width + head * attn.head_dim + dim
            for part in range(3) for head in sorted(heads) for dim in range(attn.head_dim)]


def rewrite_head_counts(model: nn.Module) -> list[str]:
    """Torch-Pruning slices weights only; timm reshapes by num_heads (and attn_dim): set them from the new shapes."""
    rewritten: dict[str, None] = {}
    for attn in model.modules():
        if not isinstance(attn, Attention) or attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim:
            continue
        attn.num_heads = attn.qkv.out_features // (3 * attn.head_dim)
        rewritten["num_heads"] = None
        if hasattr(attn, "attn_dim"):  # newer timm reshapes the attention output by attn_dim
            attn.attn_dim = attn.num_heads * attn.head_dim
            rewritten["attn_dim"] = None
    return list(rewritten)


def export_onnx(model: nn.Module, path: str) -> tuple[bool, str]:
    """Try the plain TorchScript ONNX export a user would run; return (ok, 'ok' or the first line of the failure)."""
    try:
        torch.onnx.export(model.eval(), (torch.zeros(1, 3, 224, 224),), path, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"])
    except Exception as error:  # any failure is a result to report, not to raise
        lines = str(error).strip().splitlines() or [type(error).__name__]
        return False, f"{type(error).__name__}: {lines[0]}"
    return True, "ok"


def zero_units(model: nn.Module, heads_to_remove: dict[int, list[int]], hidden_to_remove: dict[int, list[int]]) -> None:
    """Zero what pruning removes, so the zeroed model must compute what the pruned one does."""
    with torch.no_grad():
        for index, heads in heads_to_remove.items():
            attn = model.blocks[index].attn
            rows = qkv_rows(attn, heads)
            attn.qkv.weight[rows] = 0
            attn.qkv.bias[rows] = 0
            attn.proj.weight[:, rows[: len(rows) // 3]] = 0  # the q rows' indices are proj's input columns
        for index, hidden in hidden_to_remove.items():
            mlp = model.blocks[index].mlp
            mlp.fc1.weight[hidden] = 0
            mlp.fc1.bias[hidden] = 0
            mlp.fc2.weight[:, hidden] = 0


def self_check() -> None:
    import copy
    import tempfile
    from pathlib import Path

    import numpy as np
    import onnxruntime as ort
    import timm

    torch.manual_seed(0)
    original = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    heads = {index: [0, 1, 2] for index in range(len(original.blocks))}
    hidden = {index: list(range(768)) for index in range(len(original.blocks))}
    zeroed = copy.deepcopy(original)
    zero_units(zeroed, heads, hidden)

    params_before = sum(p.numel() for p in original.parameters())
    result = prune_with_torch_pruning(copy.deepcopy(original), heads, hidden)
    pruned = result.model.eval()

    images = torch.randn(4, 3, 224, 224)
    with torch.inference_mode():
        reference, expected, actual = original(images), zeroed(images), pruned(images)
    exact = (actual - expected).abs().max().item()
    print(f"params: {params_before:,} -> {result.params:,}")
    print(f"pruning seconds: {result.seconds:.3f}")
    print(f"needed_patch: {result.needed_patch}; patch_note: {result.patch_note}")
    block = pruned.blocks[0]
    print(f"block 0: qkv {tuple(block.attn.qkv.weight.shape)}, proj {tuple(block.attn.proj.weight.shape)}, "
          f"fc1 {tuple(block.mlp.fc1.weight.shape)}, fc2 {tuple(block.mlp.fc2.weight.shape)}, "
          f"num_heads {block.attn.num_heads}")
    print(f"max |pruned - zeroed original|: {exact:.2e} (zeroing itself moved the logits by "
          f"{(expected - reference).abs().max().item():.2e}; max |logit| {expected.abs().max().item():.2e})")
    assert exact < 1e-4, "Torch-Pruning did not remove exactly the given units"

    with tempfile.TemporaryDirectory() as scratch:
        path = str(Path(scratch) / "pruned.onnx")
        ok, message = export_onnx(pruned, path)
        print(f"onnx export: {ok} ({message})")
        if ok:
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            onnx_logits = np.concatenate([session.run(None, {"input": x[None].numpy()})[0] for x in images])
            print(f"max |onnxruntime - torch| on the pruned model: {np.abs(onnx_logits - actual.numpy()).max():.2e}")


if __name__ == "__main__":
    self_check()
