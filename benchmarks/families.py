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

    .venv/bin/python benchmarks/families.py --new [--runs 30] [--only parallel_vit xcit ...]

`--new` takes instead the transformers of issue 25's table, which evc does
not recognise as named families: one full-size timm model per row (NEW), at
its native input size, random init. evc compresses each as above (where
recognition refuses it, head_prune and ffn_prune cut the graph's pruning
groups), and Torch-Pruning prunes the same model as its
examples/timm_models/prune_timm_models.py configures it, at the same ratio
(torch_pruning_baseline.prune_as_documented), exported with the same
torch.onnx and onnxslim. The four models of each row (evc's original and
pruned Programs, Torch-Pruning's original and pruned modules) are timed on
the same input, all rows interleaved, and printed as one table; a failure
of either tool is a row's result, with the first line of its error.
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch
from _timing import interleaved  # benchmarks/, the script's own folder
from tokens import macs, run_pass  # the token benchmark's way of calling a pass and counting MACs
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from evc.ir.macs import SDPA_FORMULAS
from evc.ir.program import Program
from evc.passes.ffn_prune import FfnPrune
from evc.passes.head_prune import HeadPrune
from evc.spec.plan import ImageInput
from evc.targets.onnx import Onnx, export_module, op_counts, session

SIZE, PATCH, WIDTH, HEADS, DEPTH, CLASSES = 224, 16, 192, 3, 12, 1000  # deit_tiny's shape
KEEP, THREADS, TOLERANCE, GOAL, STAGED_GOAL = 0.5, 1, 1e-4, 0.9, 0.85  # convs and BatchNorm fold otherwise
MACS_GOAL = 0.25  # issue 25: MACs cut by at least this share at keep 0.5
TP_MEMORY = 8 << 30  # address space Torch-Pruning may add while it prunes one model
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


# issue 25's table, one full-size timm model a row, at its native input size (samvit at 224, not its 1024):
# the name, and the model with its input size.
NEW = {
    "parallel_vit": lambda: (timm.create_model("vit_small_patch16_18x2_224"), 224),
    "xcit": lambda: (timm.create_model("xcit_nano_12_p16_224"), 224),
    "coat_lite": lambda: (timm.create_model("coat_lite_mini"), 224),
    "twins_svt": lambda: (timm.create_model("twins_svt_small"), 224),
    "samvit": lambda: (timm.create_model("samvit_base_patch16", img_size=224, num_classes=CLASSES), 224),
    "mvitv2": lambda: (timm.create_model("mvitv2_tiny"), 224),
    "edgenext": lambda: (timm.create_model("edgenext_x_small"), 256),
    "maxvit": lambda: (timm.create_model("maxvit_nano_rw_256"), 256),
    "convformer": lambda: (timm.create_model("convformer_s18"), 224),
    "mobilevitv2": lambda: (timm.create_model("mobilevitv2_075"), 256),
    "siglip": lambda: (timm.create_model("vit_base_patch16_siglip_256", num_classes=CLASSES), 256),
    "features_only": lambda: (timm.create_model("vit_small_patch16_224", features_only=True, out_indices=(-1,)), 224),
}


def pruned(program: Program) -> Program:
    return ffn_pruned(head_pruned(program))


def head_pruned(program: Program) -> Program:
    if program.structure is not None and not any(b.attn for b in program.structure.blocks):
        return program  # fastvit_t12 has no attention
    return run_pass(HeadPrune().run, program, keep=KEEP, score="l1", scope="layer", min_heads=1, data=None)


def ffn_pruned(program: Program) -> Program:
    return run_pass(FfnPrune().run, program, keep=KEEP, score="l1", round_to=8, data=None)


def lowered(name: str, programs: dict[str, Program], work: Path, feed: np.ndarray) -> dict[str, dict]:
    """Each program exported as the onnx format does, checked against PyTorch on `feed`, with its session."""
    onnx = Onnx()
    out = {}
    for kind, program in programs.items():
        path = work / f"{name}.{kind}.onnx"
        onnx.export(program, path)
        run, diff = checked(path, program.graph, feed)
        out[kind] = {"path": path, "run": run, "diff": diff, "macs": macs(program),
                     "goal": STAGED_GOAL if program.structure.stages else GOAL,
                     "ops": sum(op_counts(path).values()), "shape": _shape(program)}
    return out


def checked(path: Path, module, feed: np.ndarray):
    """The ONNX model at `path` as run(x), and its max abs diff from `module` on `feed`."""
    run = session(path, THREADS)
    with torch.inference_mode():
        diff = float(np.abs(run(feed) - _tensor(module(torch.from_numpy(feed))).numpy()).max())
    return run, diff


def _tensor(output) -> torch.Tensor:
    """A model's output tensor: the first of a list (timm's features_only returns one map per index)."""
    return output[0] if isinstance(output, (list, tuple)) else output


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


def first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:150]}" if lines else type(error).__name__


def module_macs(module: nn.Module, x: torch.Tensor) -> int:
    """MACs of one forward of `module`, counted as evc counts a Program's (torch's FLOP counter, halved)."""
    counter = FlopCounterMode(display=False, custom_mapping=SDPA_FORMULAS)
    with torch.no_grad(), counter:
        module(x)
    return counter.get_total_flops() // 2


def evc_side(module: nn.Module, size: int, feed: np.ndarray, work: Path) -> dict:
    """evc's own path: the Program, head_prune then ffn_prune at KEEP, exported as the onnx format does."""
    side, stage = {"runs": {}}, "capture"
    try:
        original = Program.from_module(copy.deepcopy(module), ImageInput(size, size))
        side["how"] = "recognised ViT" if original.structure is not None else "pruning groups"
        stage = "head_prune"
        heads = head_pruned(original)
        stage = "ffn_prune"
        after = ffn_pruned(heads)
        side["macs"] = [macs(p) for p in (original, heads, after)]
        stage = "ONNX"
        side["runs"] = sessions({"original": original, "pruned": after}, Onnx().export, work / "evc", feed)
    except Exception as error:  # noqa: BLE001 - evc's failure on a model is this row's result
        side.update(failed=f"{stage}: {first_line(error)}", runs={})
    return side


def torch_pruning_side(module: nn.Module, feed: np.ndarray, work: Path) -> dict:
    """Torch-Pruning as its timm example configures it, at ratio 1 - KEEP, exported with the same torch.onnx."""
    from torch_pruning_baseline import as_example_builds, prune_as_documented

    x, side, stage = torch.from_numpy(feed), {"runs": {}}, "pruning"
    try:
        original = as_example_builds(copy.deepcopy(module))
        with address_space(TP_MEMORY):  # its dependency graph of maxvit_nano_rw_256 grows past 20 GB
            pruned = prune_as_documented(copy.deepcopy(original), x, 1 - KEEP)
        stage = "the pruned model's forward"
        with torch.inference_mode():
            shapes = [tuple(_tensor(m(x)).shape) for m in (original, pruned)]
        if shapes[0] != shapes[1]:
            raise ValueError(f"its output changed shape, {shapes[0]} to {shapes[1]}")
        side["macs"] = [module_macs(m, x) for m in (original, pruned)]
        stage = "ONNX"
        side["runs"] = sessions({"original": original, "pruned": pruned},
                                lambda model, path: export_module(model, (x,), path), work / "tp", feed)
    except Exception as error:  # noqa: BLE001 - Torch-Pruning's failure is this row's result
        side.update(failed=f"{stage}: {first_line(error)}", runs={})
    return side


def sessions(models: dict, export, stem: Path, feed: np.ndarray) -> dict:
    """Each model exported by `export(model, path)` and run in ONNX Runtime; AssertionError on a parity miss."""
    runs = {}
    for kind, model in models.items():
        path = stem.with_name(f"{stem.name}.{kind}.onnx")
        export(model, path)
        runs[kind], diff = checked(path, getattr(model, "graph", model), feed)
        if diff > TOLERANCE:
            raise AssertionError(f"parity miss: the {kind} model's max abs diff {diff:.1e} > {TOLERANCE:g}")
    return runs


def compare(name: str, work: Path) -> dict:
    torch.manual_seed(0)
    module, size = NEW[name]()
    feed = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    row = {"size": size, "feed": feed}
    for tool, side in (("evc", lambda: evc_side(module.eval(), size, feed, work / name)),
                       ("tp", lambda: torch_pruning_side(module, feed, work / name))):
        start = time.perf_counter()
        row[tool] = side()
        done = row[tool].get("failed") or "MACs " + " → ".join(f"{m / 1e9:.3f}" for m in row[tool]["macs"]) + " G"
        print(f"{name}, {tool}, {time.perf_counter() - start:.0f} s: {done}", flush=True)
    return row


@contextmanager
def address_space(extra: int):
    """At most `extra` bytes more address space inside the block: MemoryError instead of the machine's OOM killer."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = int(Path("/proc/self/status").read_text().split("VmSize:")[1].split()[0]) * 1024
    limit = used + extra if hard == resource.RLIM_INFINITY else min(hard, used + extra)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    except MemoryError as error:
        raise MemoryError(f"past {extra / (1 << 30):g} GiB more address space") from error
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def compare_new(names: list[str], runs: int) -> None:
    work = Path(tempfile.mkdtemp())
    rows = {}
    for name in names:
        (work / name).mkdir()
        rows[name] = compare(name, work)
    timed = {(name, tool, kind): (lambda _, run=run, feed=row["feed"]: run(feed))
             for name, row in rows.items() for tool in ("evc", "tp") for kind, run in row[tool]["runs"].items()}
    medians = interleaved(timed, None, runs)
    print(f"\nhead_prune keep {KEEP} + ffn_prune keep {KEEP} (l1) against Torch-Pruning at pruning_ratio "
          f"{1 - KEEP}; random init; ONNX Runtime {ort.__version__}, {THREADS} thread; median of {runs} runs "
          f"after 10 warm-ups, all {len(timed)} models interleaved. Goals: MACs cut ≥ {MACS_GOAL:.0%}, "
          f"realized / ideal ≥ {GOAL}")
    print("\n| model | input | evc | MACs (G) before → after heads → after FFN | cut | ORT ms before → after "
          "| ideal | realized | realized / ideal | Torch-Pruning | MACs (G) before → after | cut "
          "| ORT ms before → after | ideal | realized | realized / ideal |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        cells = [name, str(row["size"])]
        for tool in ("evc", "tp"):
            cells += _cells(row[tool], {kind: medians[name, tool, kind] for kind in row[tool]["runs"]}, tool)
        print("| " + " | ".join(cells) + " |")


def _cells(side: dict, ms: dict, tool: str) -> list[str]:
    """One tool's cells of a row: what it did, MACs, cut, ms, ideal, realized, realized / ideal."""
    width = 7 if tool == "evc" else 6
    if "failed" in side:
        return [f"failed: {side['failed']}"] + ["-"] * (width - 1)
    before, after = side["macs"][0], side["macs"][-1]
    cut, ideal, realized = 1 - after / before, before / after, ms["original"] / ms["pruned"]
    what = "pruned"
    if tool == "evc":
        cuts = {"heads": side["macs"][1] < before, "FFN": after < side["macs"][1]}
        what = f"{' + '.join(k for k, cut in cuts.items() if cut) or 'nothing'} cut ({side['how']})"
    return [what, " → ".join(f"{m / 1e9:.3f}" for m in side["macs"]), f"{cut:.1%}: {_goal(cut >= MACS_GOAL)}",
            f"{ms['original']:.1f} → {ms['pruned']:.1f}", f"{ideal:.2f}", f"{realized:.2f}",
            f"{realized / ideal:.3f}: {_goal(realized / ideal >= GOAL)}"]


def _goal(met: bool) -> str:
    return "met" if met else "missed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=None, help="timed runs (default 100; 30 with --new)")
    parser.add_argument("--new", action="store_true", help="issue 25's transformers, evc beside Torch-Pruning")
    parser.add_argument("--only", nargs="+", choices=list(FAMILIES) + list(NEW))
    args = parser.parse_args()
    if args.new:
        return compare_new(args.only or list(NEW), args.runs or 30)
    args.runs = args.runs or 100
    args.only = args.only or list(FAMILIES)

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
