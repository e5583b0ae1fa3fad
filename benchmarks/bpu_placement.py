"""Where every node of full-size ViTs runs on the RDK X5, before and after evc's BPU-native lowering.

    .venv/bin/python benchmarks/bpu_placement.py     # a few minutes on 2 cores

For each model (random weights: placement does not depend on them), the ONNX
export as it was lowered before the rewrites (Softmax and uneven Splits only)
and after them, each judged by the same operator check the X5 bundle's
op_check.json comes from (the device's operator table, targets/devices/
rdk_x5.json), and the rewritten model's largest difference from PyTorch on
one image. The passes are those of the specs in specs/, and the token passes
at the strengths the issue measured (token_merge r = 8 on deit_small).
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import timm
import torch
from _passes import Ctx  # benchmarks/, the script's own folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evc.ir.program import Program  # noqa: E402
from evc.plan import ImageInput  # noqa: E402
from evc.registry import DEVICES, PASSES, load_plugins  # noqa: E402

load_plugins()
FACTS = DEVICES["rdk_x5"].facts
from evc.targets._bpu_ops import check_ops  # noqa: E402
from evc.targets.bpu import for_the_bpu, lowered_for_the_bpu  # noqa: E402
from evc.targets.onnx import export_onnx, session  # noqa: E402


def run(program, name, **params):
    return PASSES[name].plugin.run(program, params, Ctx(params))


def loaded(name: str) -> Program:
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    size = model.default_cfg["input_size"][-1]
    return Program.from_module(model, ImageInput(size, size))


def pruned(program, heads, units, round_to=1):
    program = run(program, "head_prune", keep=heads, score="l1", scope="layer", min_heads=1, data=None)
    return run(program, "ffn_prune", keep=units, score="l1", round_to=round_to, data=None)


MODELS = {
    "deit_tiny": lambda: loaded("deit_tiny_patch16_224"),
    "deit_tiny, specs/deit_tiny_x5.evc's passes": lambda: pruned(loaded("deit_tiny_patch16_224"), 2 / 3, 0.7),
    "deit_small": lambda: loaded("deit_small_patch16_224"),
    "deit_small, specs/deit_small_android.evc's passes": lambda: pruned(loaded("deit_small_patch16_224"), 2 / 3,
                                                                        0.75),
    "deit_small, patch_slim (Patch Slimming's schedule, fuse)": lambda: run(
        loaded("deit_small_patch16_224"), "patch_slim", keep=[1, 1, 1, 0.7, 0.7, 0.7, 0.5, 0.5, 0.5, 0.4, 0.4, 0.4],
        score="cls_attention", fuse=True, search=None),
    "deit_small, token_merge r = 8": lambda: run(loaded("deit_small_patch16_224"), "token_merge", r=8,
                                                 proportional=True),
    "efficientvit_m5, specs/efficientvit_m5_x5.evc's passes": lambda: pruned(loaded("efficientvit_m5"), 1 / 2, 0.75,
                                                                             8),
}


def main() -> None:
    print(f"machine: {platform.machine()}, torch {torch.__version__}, onnx {onnx.__version__}\n")
    print("| model | nodes | on the CPU before | on the CPU after | unsupported after | max abs diff to PyTorch |")
    print("|---|---|---|---|---|---|")
    for label, make in MODELS.items():
        start = time.perf_counter()
        program = make()
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.onnx"
            export_onnx(program, path, FACTS["onnx"]["opset"])
            raw = onnx.load(path)
            for_the_bpu(raw, FACTS)
            softmax = {n.name for n in raw.graph.node if n.op_type == "Softmax"}
            before = check_ops(raw, FACTS, softmax)["summary"]
            model = lowered_for_the_bpu(onnx.load(path), FACTS)
            onnx.save(model, path)
            after = check_ops(model, FACTS, softmax)["summary"]
            x = np.random.default_rng(0).standard_normal((1, *program.input.shape[1:])).astype(np.float32)
            diff = np.abs(session(path)(x) - program.run(torch.from_numpy(x)).detach().numpy()).max()
        print(f"| {label} | {len(model.graph.node)} | {before['cpu']} | {after['cpu']} | {after['unsupported']} "
              f"| {diff:.1e} |", flush=True)
        print(f"{label}: {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
