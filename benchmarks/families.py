"""Head and FFN pruning on every ViT family evc captures: MACs saved against time saved, in ONNX Runtime.

    .venv/bin/python benchmarks/families.py [--runs 100] [--only deit_tiny hf_vit ...]

One model of each family at deit_tiny's shape (width 192, 3 heads of 64,
depth 12, MLP 768, patch 16, 224×224 input, 1000 classes), random init,
built with its library's own classes. Each goes through evc's own pipeline:
captured as a Program, `head_prune { keep = 0.5 }` then
`ffn_prune { keep = 0.5 }` (l1 scores), MACs counted by evc's summary, and
the original and pruned Programs exported as the onnx format lowers them
(torch.onnx, onnxslim), each checked against its Program on one image. All
of them are then timed in ONNX Runtime at 1 thread, the models taking turns
run by run so that the machine's noise falls on all alike.

Adding a family is one line in FAMILIES: a name and a function that returns
the model at 224×224.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch
from _timing import interleaved  # benchmarks/, the script's own folder
from tokens import macs, run_pass  # the token benchmark's way of calling a pass and counting MACs
from torch import nn

from evc.ir.program import Program
from evc.passes.ffn_prune import FfnPrune
from evc.passes.head_prune import HeadPrune
from evc.spec.plan import ImageInput
from evc.targets.onnx import Onnx, op_counts

SIZE, PATCH, WIDTH, HEADS, DEPTH, CLASSES = 224, 16, 192, 3, 12, 1000  # deit_tiny's shape
KEEP, THREADS, TOLERANCE, GOAL, STAGED_GOAL = 0.5, 1, 1e-4, 0.9, 0.85  # convs and BatchNorm fold otherwise
ROOT = Path(__file__).resolve().parent.parent


def plain_vit() -> nn.Module:
    sys.path.insert(0, str(ROOT / "examples" / "plain_vit"))
    from vit import plain_vit_tiny

    return plain_vit_tiny(num_classes=CLASSES, img_size=SIZE, patch_size=PATCH, dim=WIDTH, depth=DEPTH, heads=HEADS)


def torchvision_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=SIZE, patch_size=PATCH, num_layers=DEPTH, num_heads=HEADS,
                              hidden_dim=WIDTH, mlp_dim=4 * WIDTH, num_classes=CLASSES)
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts it at zero: parity would be vacuous
    return model


def hf_vit(attention: str) -> nn.Module:
    """transformers' ViTForImageClassification, not wrapped: evc takes its logits itself."""
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(_hf_config(ViTConfig, attention))


def hf_deit_distilled() -> nn.Module:
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    return DeiTForImageClassificationWithTeacher(_hf_config(DeiTConfig, "eager"))


def _hf_config(config_class, attention: str):
    config = config_class(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                          intermediate_size=4 * WIDTH, image_size=SIZE, patch_size=PATCH, num_labels=CLASSES)
    config._attn_implementation = attention
    return config


def einops_vit() -> nn.Module:
    sys.path.insert(0, str(ROOT / "examples" / "einops_vit"))
    from einops_vit import EinopsViT

    return EinopsViT(image_size=SIZE, dim=WIDTH, depth=DEPTH, heads=HEADS, dim_head=WIDTH // HEADS, patch=PATCH,
                     num_classes=CLASSES)


# One line a family: its name (as in docs/models.md) and the model at SIZE × SIZE.
FAMILIES = {
    "deit_tiny": lambda: timm.create_model("deit_tiny_patch16_224"),
    "deit_tiny_distilled": lambda: timm.create_model("deit_tiny_distilled_patch16_224"),
    "vit_gap": lambda: timm.create_model("vit_tiny_patch16_224", class_token=False, global_pool="avg"),
    "plain_vit": plain_vit,
    "torchvision_vit": torchvision_vit,
    "hf_vit": lambda: hf_vit("eager"),
    "hf_vit_sdpa": lambda: hf_vit("sdpa"),
    "hf_deit_distilled": hf_deit_distilled,
    "einops_vit": einops_vit,
    # relative position bias per head, q/v biases folded into the qkv Linear
    "beit": lambda: timm.create_model("beit_base_patch16_224", embed_dim=WIDTH, num_heads=HEADS, depth=DEPTH),
    # SwiGLU packed in one Linear (hidden 512), rotary embeddings, patch 14 (256 patches)
    "eva02": lambda: timm.create_model("eva02_tiny_patch14_224", num_classes=CLASSES),
    # talking heads, then 2 class-attention blocks
    "cait": lambda: timm.create_model("cait_xxs24_224", embed_dim=WIDTH, num_heads=HEADS, depth=DEPTH),
    # hierarchical, as timm builds them (goal for these: realized / ideal >= STAGED_GOAL)
    "swin_tiny": lambda: timm.create_model("swin_tiny_patch4_window7_224"),
    "pvt_v2_b0": lambda: timm.create_model("pvt_v2_b0"),
    "levit_128s": lambda: timm.create_model("levit_128s"),
    # on (B, C, H, W) maps with 1 x 1 convs and BatchNorm: cascaded group attention; talking heads and a
    # local v conv; no attention at all (RepMixer), so ffn_prune alone
    "efficientvit_m5": lambda: timm.create_model("efficientvit_m5"),
    "efficientformerv2_s1": lambda: timm.create_model("efficientformerv2_s1"),
    "fastvit_t12": lambda: timm.create_model("fastvit_t12"),
}


def pruned(program: Program) -> Program:
    if any(b.attn for b in program.structure.blocks):  # fastvit_t12 has no attention
        program = run_pass(HeadPrune().run, program, keep=KEEP, score="l1", scope="layer", min_heads=1, data=None)
    return run_pass(FfnPrune().run, program, keep=KEEP, score="l1", round_to=8, data=None)


def lowered(name: str, programs: dict[str, Program], work: Path, feed: np.ndarray) -> dict[str, dict]:
    """Each program exported as the onnx format does, checked against PyTorch on `feed`, with its session."""
    onnx = Onnx()
    out = {}
    for kind, program in programs.items():
        path = work / f"{name}.{kind}.onnx"
        onnx.export(program, path)
        run = onnx.session(path, THREADS)
        with torch.inference_mode():
            diff = float(np.abs(run(feed) - program.graph(torch.from_numpy(feed)).numpy()).max())
        out[kind] = {"path": path, "run": run, "diff": diff, "macs": macs(program),
                     "goal": STAGED_GOAL if program.structure.stages else GOAL,
                     "ops": sum(op_counts(path).values()), "shape": _shape(program)}
    return out


def _shape(program: Program) -> str:
    """The first attention's heads × head dim and the first MLP's hidden width."""
    attn = next((b.attn for b in program.structure.blocks if b.attn), None)
    mlp = next(b.mlp for b in program.structure.blocks if b.mlp)
    return f"{f'{attn.num_heads}×{attn.head_dim}' if attn else 'no attn'} / {mlp.hidden}"


def family(name: str, work: Path, feed: np.ndarray) -> dict[str, dict]:
    torch.manual_seed(0)
    original = Program.from_module(FAMILIES[name]().eval(), ImageInput(SIZE, SIZE))
    artifacts = lowered(name, {"original": original, "pruned": pruned(original)}, work, feed)
    print(f"{name}: heads × head dim / MLP hidden {artifacts['original']['shape']} → "
          f"{artifacts['pruned']['shape']}; ONNX vs PyTorch max abs diff "
          + ", ".join(f"{kind} {a['diff']:.1e}" for kind, a in artifacts.items()), flush=True)
    return artifacts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--only", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    args = parser.parse_args()

    feed = np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE), dtype=np.float32)
    work = Path(tempfile.mkdtemp())
    results = {name: family(name, work, feed) for name in args.only}
    bad = [f"{name} {kind}" for name, r in results.items() for kind, a in r.items() if a["diff"] > TOLERANCE]
    runs = {(name, kind): a["run"] for name, r in results.items() for kind, a in r.items()}
    medians = interleaved(runs, feed, args.runs)

    print(f"\n{SIZE}×{SIZE}, random init, head_prune keep {KEEP} + ffn_prune keep {KEEP} (l1); ONNX Runtime "
          f"{ort.__version__}, {THREADS} thread; median of {args.runs} runs after 10 warm-ups, all "
          f"{len(runs)} models interleaved")
    if bad:
        print(f"PARITY FAILED (max abs diff > {TOLERANCE:g}): {', '.join(bad)}")
    print("\n| family | heads×dim / hidden, after | MACs original (G) | MACs pruned (G) | ONNX ops original / pruned "
          "| ORT original (ms) | ORT pruned (ms) | ideal speedup | realized speedup "
          f"| realized / ideal (goal ≥ {GOAL}; ≥ {STAGED_GOAL} in stages) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        original, after = r["original"], r["pruned"]
        ideal = original["macs"] / after["macs"]
        realized = medians[name, "original"] / medians[name, "pruned"]
        verdict = "met" if realized / ideal >= original["goal"] else "missed"
        print(f"| {name} | {after['shape']} | {original['macs'] / 1e9:.3f} | {after['macs'] / 1e9:.3f} "
              f"| {original['ops']} / {after['ops']} | {medians[name, 'original']:.2f} "
              f"| {medians[name, 'pruned']:.2f} | {ideal:.2f} | {realized:.2f} | {realized / ideal:.2f}: {verdict} |")


if __name__ == "__main__":
    main()
