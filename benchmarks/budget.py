"""A budget's searched allocation against uniform keep ratios and Torch-Pruning's global pruning, on the digits ViT.

    .venv/bin/python examples/digits/prepare.py           # data/ and digits_vit.safetensors, once
    .venv/bin/pip install -r benchmarks/requirements.txt  # Torch-Pruning, benchmark only
    .venv/bin/python benchmarks/budget.py [--epochs 10]   # about 10 minutes on 2 cores

The digits ViT (examples/digits: 6 blocks of 3 heads, width 96, MLP 384,
32×32, trained on scikit-learn's digits) at half its MACs, three ways:

    evc budget      `budget { macs = 50%, data = train }` with head_prune and
                    ffn_prune by Taylor scores on train, keep left to the search
    evc budget +    the same with `patch_slim { }` before them, its kept
      patches       patches (64 at first) left to the search too
    uniform         the same passes with one keep for every block: 2 of 3
                    heads, and the MLP share that brings the MACs to 50%
                    (bisected, the largest at or under it)
    Torch-Pruning   its MetaPruner, global pruning with GroupMagnitudeImportance
                    (its ViT recipe: whole heads and channels, the head layer
                    ignored), the ratio bisected to 50% of the MACs

Each is then finetuned the same way, by evc's engine (evc.passes.train.distill:
10 epochs, lr 5e-4, batch 64, KD alpha 0.9 from the model as trained, no
augmentation), once per seed (`--seeds`, 3), and scored on the 359
validation images: the mean, and the least and most. MACs are counted by
evc (torch.utils.flop_counter with its attention formula) on every model.

Then a latency budget on the CPU: `budget { latency = 60%, on = cpu }` built
with a cpu target at 1 thread; its bundle's timing of the chosen model
against the budget.
"""

from __future__ import annotations

import argparse
import copy
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"

from evc.cache import Cache  # noqa: E402
from evc.driver import Stages, compile_model  # noqa: E402
from evc.ir import summarize  # noqa: E402
from evc.ir.program import Program  # noqa: E402
from evc.model.data import dataset  # noqa: E402
from evc.passes.train import Recipe, distill, top1  # noqa: E402
from evc.progress import Progress  # noqa: E402
from evc.spec.check import parse_and_check  # noqa: E402

TARGET = 0.5
PASSES = """    head_prune { KEEP_Hscore = taylor, data = train }
    ffn_prune  { KEEP_Uscore = taylor, data = train, round_to = 8 }"""


def spec(compress: str, extra: str = "") -> str:
    """digits.evc with another compress block (and no finetune: every way is finetuned alike, afterwards)."""
    text = (DIGITS / "digits.evc").read_text()
    text = re.sub(r"compress \{.*?\n\}\n", "compress {\n" + compress + "\n}\n", text, flags=re.S)
    return text + extra


def compiled(text: str, work: Path, name: str):
    path = DIGITS / f".bench_{name}.evc"  # beside digits.evc: its paths are relative to it
    path.write_text(text)
    try:
        plan = parse_and_check(text, path)
        return plan, compile_model(plan, Cache(work / ".cache"), Progress())
    finally:
        path.unlink()


def macs(module, image) -> int:
    program = Program.from_module(module, image)
    return summarize(program.graph, program.structure, program.example()).total.macs


def uniform(work: Path, whole: int):
    """2 of 3 heads everywhere, and the largest MLP share (a multiple of 8 units) at or under the budget,
    bisected."""
    low, high, best = 1, 48, None  # in multiples of 8 units, of 384
    while low <= high:
        mid = (low + high) // 2
        compress = PASSES.replace("KEEP_H", "keep = 2/3, ").replace("KEEP_U", f"keep = {8 * mid}/384, ")
        _, result = compiled(spec(compress), work, "uniform")
        if result.after["total"]["macs"] <= TARGET * whole:
            best, low = (8 * mid, result), mid + 1
        else:
            high = mid - 1
    return best


def torch_pruning(model, image, whole: int):
    """Torch-Pruning's global pruning on its ViT recipe, the ratio bisected to the MACs budget."""
    import torch_pruning as tp

    def pruned(ratio):
        m = copy.deepcopy(model)
        heads = {a.qkv: a.num_heads for a in m.modules() if isinstance(a, timm.models.vision_transformer.Attention)}
        pruner = tp.pruner.MetaPruner(m, torch.randn(1, 3, 32, 32),
                                      importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
                                      global_pruning=True, ignored_layers=[m.head], num_heads=heads,
                                      prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio)
        pruner.step()
        for a in m.modules():
            if isinstance(a, timm.models.vision_transformer.Attention):
                a.num_heads = pruner.num_heads[a.qkv]
                a.attn_dim = a.num_heads * a.head_dim
        return m.eval()

    low, high, best = 0.0, 0.95, None
    for _ in range(12):
        mid = (low + high) / 2
        m = pruned(mid)
        if macs(m, image) <= TARGET * whole:
            best, high = (mid, m), mid
        else:
            low = mid
    return best


def finetuned(student, teacher, train_set, val_set, epochs: int, seed: int = 0):
    torch.manual_seed(seed)
    recipe = Recipe(epochs=epochs, lr=5e-4, batch=64, alpha=0.9, temperature=1.0, device="cpu", seed=seed)
    result = distill(student, teacher, train_set, recipe)
    return result.student.eval(), top1(result.student.eval(), val_set)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3, help="finetune runs per model, each from its own seed")
    parser.add_argument("--latency-only", action="store_true", help="only the latency budget")
    args = parser.parse_args()
    if args.latency_only:
        with tempfile.TemporaryDirectory() as folder:
            latency(Path(folder))
        return
    if not (DIGITS / "digits_vit.safetensors").exists():
        raise SystemExit("run examples/digits/prepare.py first")
    lscpu = dict(line.split(":", 1) for line in
                 __import__("subprocess").run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                 if ":" in line)
    print(f"machine: {platform.machine()}, {lscpu.get('Model name', '?').strip()}, "
          f"{len(__import__('os').sched_getaffinity(0))} cores; torch {torch.__version__}, "
          f"ONNX Runtime {ort.__version__}; finetune {args.epochs} epochs\n")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        plan = parse_and_check((DIGITS / "digits.evc").read_text(), DIGITS / "digits.evc")
        original, before = Stages(plan, Cache(work / ".cache"), Progress()).loaded
        whole = before["total"]["macs"]
        train_set = dataset(plan.data["train"], original.input)
        val_set = dataset(plan.data["val"], original.input)
        teacher = original.graph.eval()
        rows = [("model as trained", whole, None, top1(teacher, val_set), None, "")]

        start = time.perf_counter()
        compress = f"    budget {{ macs = {TARGET:.0%}, data = train }}\n" + PASSES.replace("KEEP_H", "").replace(
            "KEEP_U", "")
        _, searched = compiled(spec(compress), work, "budget")
        rows.append(("evc budget (searched)", searched.after["total"]["macs"], searched.program.graph, None, None,
                     chosen_text(searched.budget)))
        print(f"searched in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        _, tokens = compiled(spec(compress.replace("    head_prune", "    patch_slim { }\n    head_prune")), work,
                             "budget_patches")
        rows.append(("evc budget (heads, units, patches)", tokens.after["total"]["macs"], tokens.program.graph,
                     None, None, chosen_text(tokens.budget)))
        units, flat = uniform(work, whole)
        rows.append(("uniform keep", flat.after["total"]["macs"], flat.program.graph, None, None,
                     f"heads 2/3, MLP {units}/384 in every block"))
        ratio, tp_model = torch_pruning(teacher_module(), original.input, whole)
        rows.append(("Torch-Pruning global", macs(tp_model, original.input), tp_model, None, None,
                     f"pruning_ratio {ratio:.3f}"))

        table = []
        for name, count, model, accuracy, _, how in rows:
            if model is None:
                table.append((name, count, accuracy, accuracy, how))
                continue
            before_ft = top1(model, val_set)
            start = time.perf_counter()
            after_ft = [finetuned(copy.deepcopy(model), teacher, train_set, val_set, args.epochs, seed)[1]
                        for seed in range(args.seeds)]
            print(f"{name}: finetuned {args.seeds}x in {time.perf_counter() - start:.0f} s", file=sys.stderr)
            table.append((name, count, before_ft, after_ft, how))

        print(f"| model | MACs | × the model's | top-1 before finetune | top-1 after {args.epochs} epochs, mean "
              f"of {args.seeds} seeds (least–most) | what was kept |")
        print("|---|---|---|---|---|---|")
        for name, count, before_ft, after_ft, how in table:
            after_ft = after_ft if isinstance(after_ft, list) else [after_ft]
            print(f"| {name} | {count / 1e6:.2f} M | {count / whole:.3f} | {100 * before_ft:.2f}% "
                  f"| {100 * sum(after_ft) / len(after_ft):.2f}% ({100 * min(after_ft):.2f}–{100 * max(after_ft):.2f}) "
                  f"| {how} |")

        latency(work)


def chosen_text(record: dict) -> str:
    from evc.passes.budget import fragment

    return "; ".join(f"{c['pass']} {fragment(c)}" for c in record["chosen"])


def teacher_module():
    """The digits ViT as timm builds it, with the trained weights: what Torch-Pruning prunes."""
    from safetensors.torch import load_file

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=96, depth=6,
                              num_heads=3, num_classes=10)
    model.load_state_dict(load_file(DIGITS / "digits_vit.safetensors"))
    return model.eval()


def latency(work: Path) -> None:
    """A latency budget on the cpu target: the chosen model timed against the budget."""
    import json
    import subprocess

    text = spec("    budget { latency = 60%, on = cpu, data = train }\n" + PASSES.replace("KEEP_H", "").replace(
        "KEEP_U", ""))
    text = re.sub(r"target cpu \{.*?\n\}\n", "target cpu {\n    device = cpu\n    format = onnx\n    threads = 1\n"
                                             "    runs = 100\n}\n", text, flags=re.S)
    text = re.sub(r"\ntarget phone \{.*?\n\}\n", "\n", text, flags=re.S)
    path = DIGITS / ".bench_latency.evc"
    path.write_text(text)
    try:
        done = subprocess.run([sys.executable, "-m", "evc", "build", str(path), "--out", str(work / "out")],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr)
        manifest = json.loads((work / "out" / ".bench_latency" / "cpu" / "manifest.json").read_text())
    finally:
        path.unlink()
    budget = manifest["budget"]
    timed = budget["timed"]
    print("\nlatency budget on the cpu target (ONNX Runtime, 1 thread), `latency = 60%`:\n")
    print("| | the model as loaded | budget | chosen model | chosen / loaded |")
    print("|---|---|---|---|---|")
    print(f"| predicted by the table (ms) | {budget['loaded_ms']:.3f} | {timed['budget_ms']:.3f} "
          f"| {timed['predicted_ms']:.3f} | {timed['predicted_share']:.3f} |")
    print(f"| measured by the build, taking turns (ms) | {timed['loaded_measured_ms']:.3f} | "
          f"{0.6 * timed['loaded_measured_ms']:.3f} | {timed['measured_ms']:.3f} | {timed['measured_share']:.3f} |")
    print(f"\nchosen: {chosen_text(budget)}")


if __name__ == "__main__":
    main()
