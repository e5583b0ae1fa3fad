"""The ViTs the X5's BPU-native lowering is judged on, made as specs/ compress them, and the judging itself.

    model, after, before = lowered(FULL_SIZE["deit_small_token_merge"].make(), tmp / "model.onnx")
    after["summary"]["cpu"]     # 0: every node on the BPU
    before["summary"]["cpu"]    # 320: the export with only the rewrites there were before the lowering

tests/targets/test_bpu_native.py checks reduced-size models and the full-size ones below;
benchmarks/bpu_placement.py prints the full-size table docs/targets.md keeps. Random weights:
placement does not depend on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import timm
import torch

from evc.ir.program import Program
from evc.registry import DEVICES, PASSES, load_plugins
from evc.spec.plan import ImageInput
from tests.passes.conftest import Ctx

load_plugins()
FACTS = DEVICES["rdk_x5"].facts
from evc.targets._bpu_ops import check_ops  # noqa: E402  (registered by load_plugins)
from evc.targets.bpu import for_the_bpu, lowered_for_the_bpu  # noqa: E402
from evc.targets.onnx import export_onnx, session  # noqa: E402


def images(size: int, n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, size, size)).astype(np.float32)


def vit(name: str, size: int | None = None, **reduced) -> Program:
    """timm's `name` at random weights; at `size` (and e.g. patch_size, depth) for a reduced-size copy."""
    torch.manual_seed(0)
    model = timm.create_model(name, **({"img_size": size} if size else {}), **reduced).eval()
    size = size or model.default_cfg["input_size"][-1]
    return Program.from_module(model, ImageInput(size, size))


def run(program: Program, name: str, **params) -> Program:
    """The pass `name` as a spec would run it with `params`, given random images where it asks for data."""
    return PASSES[name].plugin.run(program, params, Ctx(params, images(program.input.height)))


def pruned(program: Program, heads=2 / 3, units=0.7, round_to=1) -> Program:
    """head_prune then ffn_prune, scored by l1, as specs/ write them."""
    program = run(program, "head_prune", keep=heads, score="l1", scope="layer", min_heads=1, data=None)
    return run(program, "ffn_prune", keep=units, score="l1", round_to=round_to, data=None)


def slimmed(program: Program, keep) -> Program:
    return run(program, "patch_slim", keep=keep, score="cls_attention", fuse=True, search=None)


def merged(program: Program, r: int) -> Program:
    return run(program, "token_merge", r=r, proportional=True)


@dataclass(frozen=True)
class Case:
    label: str  # as benchmarks/bpu_placement.py's table names it
    make: Callable[[], Program]


# Patch Slimming's schedule: what specs/deit_small_tokens.evc's search chooses is one such keep per block.
PATCH_SLIMMING = [1, 1, 1, 0.7, 0.7, 0.7, 0.5, 0.5, 0.5, 0.4, 0.4, 0.4]
FULL_SIZE = {
    "deit_tiny": Case("deit_tiny", lambda: vit("deit_tiny_patch16_224")),
    "deit_tiny_pruned": Case("deit_tiny, specs/deit_tiny_x5.evc's passes (and deit_tiny_jetson.evc's)",
                             lambda: pruned(vit("deit_tiny_patch16_224"), 2 / 3, 0.7)),
    "deit_small": Case("deit_small", lambda: vit("deit_small_patch16_224")),
    "deit_small_pruned": Case("deit_small, specs/deit_small_android.evc's passes",
                              lambda: pruned(vit("deit_small_patch16_224"), 2 / 3, 0.75)),
    "deit_small_patch_slim": Case("deit_small, patch_slim (Patch Slimming's schedule, fuse)",
                                  lambda: slimmed(vit("deit_small_patch16_224"), PATCH_SLIMMING)),
    "deit_small_token_merge": Case("deit_small, token_merge r = 8",
                                   lambda: merged(vit("deit_small_patch16_224"), 8)),
    "efficientvit_m5_pruned": Case("efficientvit_m5, specs/efficientvit_m5_x5.evc's passes",
                                   lambda: pruned(vit("efficientvit_m5"), 1 / 2, 0.75, 8)),
}


def lowered(program: Program, path) -> tuple:
    """`program` exported to `path` at the X5's opset and lowered for its BPU, as the bpu format does: (the
    lowered model, its op check, the op check of the export with only the Softmax and uneven-Split rewrites
    there were before the BPU-native lowering). Both checks put every Softmax in node_info."""
    export_onnx(program, path, FACTS["onnx"]["opset"])
    raw = onnx.load(path)
    for_the_bpu(raw, FACTS)
    softmax = {n.name for n in raw.graph.node if n.op_type == "Softmax"}
    model = lowered_for_the_bpu(onnx.load(path), FACTS)
    onnx.save(model, path)
    return model, check_ops(model, FACTS, softmax), check_ops(raw, FACTS, softmax)


def max_abs_diff(program: Program, path, n: int = 2) -> float:
    """The largest difference of the ONNX at `path` (batch 1) from PyTorch over `n` random images."""
    x = images(program.input.height, n)
    expected = program.run(torch.from_numpy(x)).detach().numpy()
    run_onnx = session(path)
    return float(np.abs(np.concatenate([run_onnx(image[None]) for image in x]) - expected).max())
