"""A budget's allocation, judged after recovery, against uniform ratios and Torch-Pruning's global pruning.

    .venv/bin/python examples/digits/prepare.py           # for the latency budget: digits.evc's model
    .venv/bin/pip install -r benchmarks/requirements.txt  # Torch-Pruning, benchmark only
    .venv/bin/python benchmarks/budget.py [--seeds 5] [--epochs 10] [--tasks digits textures] [--budgets 0.5 0.35]
    .venv/bin/python benchmarks/budget.py --refine          # the search's second round (refine = auto)
    .venv/bin/python benchmarks/budget.py --held-out 1000   # textures judged and scored on 10000 images each
    .venv/bin/python benchmarks/budget.py --latency-only  # the latency budget on the CPU alone

Two tasks, each a ViT of 6 blocks of 3 heads, width 96, MLP 384, at 32×32 in patches of 4, trained here:

    digits      scikit-learn's handwritten digits, split as examples/digits/prepare.py splits them, a fifth
                of each class of its training images moved to `tune`; the ViT trained on the rest (40 epochs)
    textures    made here: 10 classes of noisy textures (gratings at 4 angles and 2 frequencies,
                checkerboards, dots), 90 training, 100 tune and 100 validation images per class (1000
                judged and 1000 scored: 0.5 points apart is 5 images); the ViT trained on train (15 epochs)

at each budget (half and 35% of the MACs), three ways:

    evc budget      `budget { macs = B, data = train }` with head_prune and ffn_prune by Taylor scores on
                    train, keep left to the search, and the finetune below after them: the search judges
                    its candidates by a short run of that finetune, scored on `tune` (judge_data), images
                    the ViT never trained on (evc.passes.recovery)
    uniform         the same passes with one keep for every block: heads at the share nearest the budget
                    (2/3 at 50%, 1/3 at 35%), and the largest MLP width within the budget (bisected)
    Torch-Pruning   its MetaPruner, global pruning with GroupMagnitudeImportance (its ViT recipe: whole
                    heads and channels, the head layer ignored), the ratio bisected to the budget

Each is then finetuned alike by evc's engine (evc.passes.train.distill: `--epochs`, lr 5e-4, batch 64, KD
alpha 0.9 from the model as trained, no augmentation), once per seed (`--seeds`: the data's order), and
scored on the validation images: mean ± standard deviation over the seeds. The search runs once per task
and budget, with the finetune's seed 0. MACs are counted by evc on every model.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
sys.path.insert(0, str(DIGITS))

import prepare  # noqa: E402

from evc.cache import Cache  # noqa: E402
from evc.context import PassContext  # noqa: E402
from evc.driver import Stages  # noqa: E402
from evc.ir.macs import summarize  # noqa: E402
from evc.ir.program import Program  # noqa: E402
from evc.model.data import dataset  # noqa: E402
from evc.passes.budget import pinned, search  # noqa: E402
from evc.passes.train import Recipe, distill, top1  # noqa: E402
from evc.progress import Progress  # noqa: E402
from evc.registry import PASSES  # noqa: E402
from evc.spec.check import parse_and_check  # noqa: E402

EPOCHS = {"digits": 40, "textures": 15}  # the ViT's own training
PASSES_TEXT = """    head_prune { KEEP_Hscore = taylor, data = train }
    ffn_prune  { KEEP_Uscore = taylor, data = train, round_to = 8 }"""
FINETUNE = "    finetune   {{ data = train, epochs = {epochs}, lr = 5e-4, batch = 64, alpha = 0.9, augment = none }}"
TEXTURES_SPEC = """evc 1
model textures_vit {
    source  = timm("vit_tiny_patch16_224", img_size = 32, patch_size = 4, embed_dim = 96, depth = 6,
                   num_heads = 3, num_classes = 10)
    input   = image(32, 32, mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225], crop_pct = 1.0)
    weights = "textures_vit.safetensors"
}
data train { images = "data/train" }
data val   { images = "data/val" }
compress {
}
target cpu { device = cpu, format = onnx }
"""


def textures(root: Path, held_out: int = 100, per_class: int = 150, seed: int = 0) -> None:
    """10 classes of 32×32 textures, each image with its own phase, frequency, contrast, tint and noise:
    gratings at 0, 45, 90 and 135 degrees at a low and a high frequency, checkerboards and dots. Of
    `per_class` a class, a fifth go to val, a fifth to tune and the rest to train; then as many more a class
    to each of tune and val as make `held_out` there, drawn from a second stream so that the first images
    (and the ViT trained on them) are the same whatever `held_out` is."""
    first, second = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    more = held_out - per_class // 5
    for label in range(10):
        for i in range(per_class):
            part = "val" if i < per_class // 5 else "tune" if i < 2 * (per_class // 5) else "train"
            _texture(first, label).save(_slot(root, part, label, i))
    for label in range(10):
        for i in range(2 * more):
            _texture(second, label).save(_slot(root, "val" if i < more else "tune", label, per_class + i))


def _slot(root: Path, part: str, label: int, i: int) -> Path:
    folder = root / "data" / part / str(label)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{i:04d}.png"


def _texture(rng, label: int):
    """One image of class `label`, drawn from `rng`."""
    from PIL import Image

    y, x = np.mgrid[0:32, 0:32].astype(np.float32)
    phase, contrast = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 1.0)
    if label < 8:
        angle = np.pi / 4 * (label % 4) + rng.normal(0, 0.12)
        frequency = (0.12 if label < 4 else 0.3) * rng.uniform(0.8, 1.25)
        value = np.sin(2 * np.pi * frequency * (x * np.cos(angle) + y * np.sin(angle)) + phase)
    elif label == 8:
        size = rng.uniform(3, 6)
        value = np.sign(np.sin(np.pi * (x + phase) / size) * np.sin(np.pi * (y + phase) / size))
    else:
        value = -np.ones_like(x)
        for cx, cy in rng.uniform(0, 32, (rng.integers(4, 10), 2)):
            value[(x - cx) ** 2 + (y - cy) ** 2 < rng.uniform(2, 9)] = 1
    gray = 0.5 + 0.5 * contrast * value + rng.normal(0, 0.35, value.shape)
    rgb = np.clip(gray[..., None] * rng.uniform(0.6, 1.0, 3), 0, 1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def task(name: str, work: Path, held_out: int = 100) -> Path:
    """The task's spec under `work`, with three splits: train (the ViT's training images and the finetune's),
    tune (images the ViT never trained on: the budget judges its candidates there) and val (the score).
    Textures have `held_out` tune and as many val images a class; the training images stay the same."""
    folder = work / name
    if name == "digits":
        prepare.write_folders(folder / "data")
        held(folder / "data", "train", "tune", 0.2)
        text = (DIGITS / "digits.evc").read_text()
    else:
        textures(folder, held_out)
        text = TEXTURES_SPEC
    text = text.replace('data val ', 'data tune  { images = "data/tune" }\ndata val ', 1)
    torch.manual_seed(0)
    model = prepare.digits_vit()
    start = time.perf_counter()
    prepare.train(model, *prepare.read_folder(folder / "data" / "train"), epochs=EPOCHS[name])
    print(f"{name}: the ViT trained in {time.perf_counter() - start:.0f} s, val top-1 "
          f"{prepare.top1(model, *prepare.read_folder(folder / 'data' / 'val')):.2%}", file=sys.stderr)
    prepare.save_file(model.state_dict(), folder / f"{name}_vit.safetensors")
    path = folder / f"{name}.evc"
    path.write_text(text)
    return path


def held(root: Path, source: str, to: str, share: float, seed: int = 0) -> None:
    """Move `share` of each class of root/source to root/to (seeded)."""
    rng = np.random.default_rng(seed)
    for folder in sorted((root / source).iterdir()):
        files = sorted(folder.glob("*.png"))
        (root / to / folder.name).mkdir(parents=True, exist_ok=True)
        for k in rng.permutation(len(files))[:round(share * len(files))]:
            files[k].rename(root / to / folder.name / files[k].name)


def spec(base: Path, compress: str) -> str:
    """The task's spec with another compress block, and no evaluate block (each way is scored alike)."""
    text = re.sub(r"compress \{.*?\n\}\n", "compress {\n" + compress + "\n}\n", base.read_text(), flags=re.S)
    return re.sub(r"\nevaluate \{[^}]*\}\n", "\n", text)


def planned(base: Path, text: str, name: str):
    path = base.with_name(f".bench_{name}.evc")  # beside the task's spec: its paths are relative to it
    path.write_text(text)
    try:
        return parse_and_check(text, path)
    finally:
        path.unlink()


def compressed(plan, original, passes):
    """`passes` run on the model as loaded, as a build runs them."""
    program = original
    for p in passes:
        program = PASSES[p.name].plugin.run(program, p.params, PassContext(plan, p, original, "", None, Progress()))
    return program


def macs(module, image) -> int:
    program = Program.from_module(module, image)
    return summarize(program.graph, program.structure, program.example()).total.macs


def searched(base: Path, original, before: dict, budget: float, epochs: int, refine: bool = False):
    """The budget's choice, judged after recovery by the finetune, and the model its passes make (before
    that finetune); the search's record and seconds, and a function that makes any judged candidate's model
    from its record entry."""
    more = ", refine = auto" if refine else ""
    compress = (f"    budget     {{ macs = {budget:.0%}, data = train, judge_data = tune{more} }}\n"
                + PASSES_TEXT.replace("KEEP_H", "").replace("KEEP_U", "") + "\n" + FINETUNE.format(epochs=epochs))
    plan = planned(base, spec(base, compress), "budget")
    start = time.perf_counter()
    passes, record = search(plan, original, before, Progress(), f"bench-{budget}")
    seconds = time.perf_counter() - start

    def made(passes):
        return compressed(plan, original, [p for p in passes if p.name != "finetune"])

    return made(passes), record, seconds, lambda candidate: made(pinned(plan.passes, {"chosen": candidate["chosen"]}))


def uniform(base: Path, original, budget: float, whole: int):
    """Heads at the share nearest the budget in every block, and the largest MLP width (a multiple of 8 of
    384) within the budget, bisected."""
    heads = max(1, math.floor(budget * 3 + 0.5))
    units, program = allocated(base, original, budget * whole, [heads] * 6, [1.0] * 6)
    return f"heads {heads}/3, MLP {units[0]}/384 in every block", program


def torch_pruning(model, image, budget: float, whole: int):
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

    from evc.errors import InputError

    low, high, best = 0.0, 0.95, None
    for _ in range(12):
        mid = (low + high) / 2
        m = pruned(mid)
        try:
            count = macs(m, image)
        except InputError:  # a block left with no head: the ratio goes too far
            high = mid
            continue
        if count <= budget * whole:
            best, high = (mid, m), mid
        else:
            low = mid
    return best


def finetuned(student, teacher, train_set, val_set, epochs: int, seed: int = 0):
    recipe = Recipe(epochs=epochs, lr=5e-4, batch=64, alpha=0.9, temperature=1.0, device="auto", seed=seed)
    result = distill(student, teacher, train_set, recipe, progress=lambda *_: None)
    return result.student.eval(), top1(result.student.eval(), val_set)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=5, help="finetune runs per model, each from its own seed")
    parser.add_argument("--tasks", nargs="+", default=["digits", "textures"], choices=["digits", "textures"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.35])
    parser.add_argument("--refine", action="store_true",
                        help="the search's second round (refine = auto): the best uniform ratios and their neighbours")
    parser.add_argument("--latency-only", action="store_true", help="only the latency budget")
    parser.add_argument("--no-latency", action="store_true", help="leave the latency budget out")
    parser.add_argument("--every", action="store_true",
                        help="finetune every candidate the search judged, not only its choice: how well the "
                             "judge's ranking foretells the finetuned one")
    parser.add_argument("--held-out", type=int, default=100, metavar="N",
                        help="textures: N tune and N val images a class (the ViT and its training images unchanged)")
    parser.add_argument("--random", type=int, default=0, metavar="N",
                        help="instead of the three ways: uniform ratios and N random allocations of the same "
                             "passes, each finetuned with no judge (what any search of these passes could reach)")
    args = parser.parse_args()
    if args.latency_only:
        with tempfile.TemporaryDirectory() as folder:
            latency(Path(folder))
        return
    lscpu = dict(line.split(":", 1) for line in
                 __import__("subprocess").run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                 if ":" in line)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"machine: {platform.machine()}, {lscpu.get('Model name', '?').strip()}, "
          f"{len(__import__('os').sched_getaffinity(0))} cores; torch {torch.__version__}, "
          f"ONNX Runtime {ort.__version__}; GPU: {gpu}; "
          f"finetune {args.epochs} epochs, {args.seeds} seeds\n")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for name in args.tasks:
            base = task(name, work, args.held_out)
            plan = parse_and_check(base.read_text(), base)
            original, before = Stages(plan, Cache(work / ".cache"), Progress()).loaded
            whole = macs(original.graph, original.input)
            train_set = dataset(plan.data["train"], original.input)
            val_set = dataset(plan.data["val"], original.input)
            tune_set = dataset(plan.data["tune"], original.input)
            teacher = original.graph.eval()
            for budget in args.budgets:
                if args.random:
                    drawn(name, base, original, teacher, whole, budget, train_set, val_set, args)
                    continue
                compare(name, base, original, before, teacher, whole, budget, train_set, val_set, tune_set, args)
        if "digits" in args.tasks and not args.no_latency and not args.random:
            latency(work)


def compare(name, base, original, before, teacher, whole, budget, train_set, val_set, tune_set, args) -> None:
    """One task at one budget: the three ways, each finetuned once per seed; a table, and the verdict."""
    program, record, seconds, candidate_model = searched(base, original, before, budget, args.epochs, args.refine)
    judge = record["judge"]
    rows = [("evc budget (judged after recovery)", program.graph,
             f"{judge['winner']}: {chosen_text(record)}")]
    how, flat = uniform(base, original, budget, whole)
    rows.append(("uniform keep", flat.graph, how))
    ratio, tp_model = torch_pruning(teacher_module(base), original.input, budget, whole)
    rows.append(("Torch-Pruning global", tp_model, f"pruning_ratio {ratio:.3f}"))
    print(f"### {name}, macs = {budget:.0%}\n")
    rounds = [*judge.get("earlier_rounds", []), judge]
    print(f"the search: {seconds:.0f} s, on {judge['images']} {judge['on']}, in {len(rounds)} round(s)")
    for round_ in rounds:
        print(f"\n{len(round_['candidates'])} candidates judged after {round_['steps']} steps, bar "
              f"{round_['bar']:.2f} standard errors:\n")
        print(f"| candidate | MACs | top-1 there | loss there | lead over {round_['baseline']} (SE) |")
        print("|---|---|---|---|---|")
        for c in round_["candidates"]:
            mark = " (chosen)" if c["name"] == round_["winner"] else ""
            top = f"{100 * c['top1']:.2f}%" if c["top1"] is not None else "–"
            loss = f"{c['loss']:.4f}" if c["loss"] is not None else "not judged"
            lead = f"{100 * c['lead']:+.2f} ({100 * c['se']:.2f})" if c["lead"] is not None else "–"
            print(f"| {c['name']}{mark} | {c['count'] / 1e6:.2f} M | {top} | {loss} | {lead} |")
    print(f"\n| model | MACs | × the model's | top-1 before finetune | top-1 after {args.epochs} epochs, mean ± std "
          f"of {args.seeds} seeds | what was kept |")
    print("|---|---|---|---|---|---|")
    print(f"| model as trained | {whole / 1e6:.2f} M | 1.000 | {100 * top1(teacher, val_set):.2f}% | | |")
    after = {}
    for label, model, kept in rows:
        count = macs(model, original.input)
        start = time.perf_counter()
        scores = [finetuned(copy.deepcopy(model), teacher, train_set, val_set, args.epochs, seed)[1]
                  for seed in range(args.seeds)]
        print(f"{name} {budget:.0%} {label}: finetuned {args.seeds}x in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
        after[label] = scores
        print(f"| {label} | {count / 1e6:.2f} M | {count / whole:.3f} | {100 * top1(model, val_set):.2f}% "
              f"| {100 * statistics.mean(scores):.2f} ± {100 * statistics.stdev(scores):.2f}% | {kept} |")
    ours, flat_ = after[rows[0][0]], after["uniform keep"]
    difference = statistics.mean(ours) - statistics.mean(flat_)
    error = math.sqrt(statistics.variance(ours) / len(ours) + statistics.variance(flat_) / len(flat_))
    verdict = "met" if difference > error else "not met"
    print(f"\nsearched − uniform: {100 * difference:+.2f} points, standard error of the difference "
          f"{100 * error:.2f}: goal (more than one standard error above uniform) {verdict}\n", flush=True)
    if args.every:
        every(judge, candidate_model, teacher, train_set, val_set, tune_set, args)


def every(judge, candidate_model, teacher, train_set, val_set, tune_set, args) -> None:
    """Every candidate of the deciding round finetuned alike: its judged top-1 beside its finetuned one, and its
    gain over the baseline (the best uniform ratios there) with the standard error of that gain."""
    print(f"every candidate, finetuned {args.epochs} epochs, {args.seeds} seeds:\n")
    print("| candidate | judged top-1 (tune) | finetuned top-1 on tune, mean | finetuned top-1, mean ± std "
          f"| − {judge['baseline']} (SE) |")
    print("|---|---|---|---|---|")
    scores = {}
    for c in sorted(judge["candidates"], key=lambda c: c["name"] != judge["baseline"]):
        if c["top1"] is None:
            continue
        model = candidate_model(c).graph
        runs = [finetuned(copy.deepcopy(model), teacher, train_set, val_set, args.epochs, seed)
                for seed in range(args.seeds)]
        scores[c["name"]] = [score for _, score in runs]
        on_tune = statistics.mean(top1(student, tune_set) for student, _ in runs)
        flat, mine = scores[judge["baseline"]], scores[c["name"]]
        gain = statistics.mean(mine) - statistics.mean(flat)
        error = math.sqrt(statistics.variance(mine) / len(mine) + statistics.variance(flat) / len(flat))
        mark = " (chosen)" if c["name"] == judge["winner"] else ""
        print(f"| {c['name']}{mark} | {100 * c['top1']:.2f}% | {100 * on_tune:.2f}% | "
              f"{100 * statistics.mean(mine):.2f} ± {100 * statistics.stdev(mine):.2f}% "
              f"| {100 * gain:+.2f} ({100 * error:.2f}) |", flush=True)
    print()


def drawn(name, base, original, teacher, whole, budget, train_set, val_set, args) -> None:
    """Uniform ratios (each share of the heads, the MLP bisected) and `--random` allocations, each finetuned
    alike with no judge. Half the allocations are drawn far: heads per block from 1 to 3, each block's MLP
    share 0.4 to 1.6 times one share bisected to the budget; half near the best uniform ratios: its heads with
    each block's moved by one a third of the time, the MLP's shares 0.75 to 1.25 times one. Each allocation's
    mean paired lead over the best uniform ratios, seed by seed, with its standard error."""
    rng = np.random.default_rng(1)
    print(f"### {name}, macs = {budget:.0%}: uniform ratios and {args.random} random allocations, each finetuned "
          f"{args.epochs} epochs, {args.seeds} seeds\n")
    runs = [run for h in (1, 2, 3) if (run := _finetuned_allocation(
        f"uniform, heads {h}/3", [h] * 6, [1.0] * 6, base, original, teacher, whole, budget, train_set, val_set,
        args)) is not None]
    best = max(runs, key=lambda run: run[-1].mean())
    for i in range(args.random):
        if i % 2 == 0:
            heads, weights, label = rng.integers(1, 4, 6), rng.uniform(0.4, 1.6, 6), f"far {i // 2}"
        else:
            moved = rng.choice([-1, 0, 1], 6, p=[1 / 6, 2 / 3, 1 / 6])
            heads, weights, label = np.clip(best[1] + moved, 1, 3), rng.uniform(0.75, 1.25, 6), f"near {i // 2}"
        run = _finetuned_allocation(label, [int(h) for h in heads], [float(w) for w in weights], base, original,
                                    teacher, whole, budget, train_set, val_set, args)
        if run is not None:
            runs.append(run)
    print("| allocation | heads kept per block | MLP units kept per block | × the model's MACs "
          "| finetuned top-1, mean ± std | − the best uniform (SE) |")
    print("|---|---|---|---|---|---|")
    for label, heads, units, share, scores in runs:
        lead = scores - best[-1]
        print(f"| {label} | {heads} | {units} | {share:.3f} | {100 * scores.mean():.2f} ± "
              f"{100 * scores.std(ddof=1):.2f}% | {100 * lead.mean():+.2f} "
              f"({100 * lead.std(ddof=1) / math.sqrt(len(lead)):.2f}) |")
    print(flush=True)


def _finetuned_allocation(label, heads, weights, base, original, teacher, whole, budget, train_set, val_set, args):
    """(label, heads, MLP units, share of the MACs, top-1 per seed) of one allocation finetuned; None when
    it cannot meet the budget."""
    fitted = allocated(base, original, budget * whole, heads, weights)
    if fitted is None:
        print(f"{label}: over the budget at the least MLP", file=sys.stderr)
        return None
    units, program = fitted
    scores = np.array([finetuned(copy.deepcopy(program.graph), teacher, train_set, val_set, args.epochs, seed)[1]
                       for seed in range(args.seeds)])
    print(f"{label}: heads {heads}, MLP {units}, {100 * scores.mean():.2f}%", file=sys.stderr, flush=True)
    return label, heads, units, macs(program.graph, original.input) / whole, scores


def allocated(base: Path, original, limit: float, heads: list[int], weights: list[float]):
    """(MLP units per block, the model) for `heads` of 3 kept per block and each block's MLP at its weight
    times the largest share within `limit` MACs (bisected, multiples of 8 of 384); None when even the least
    MLP is over it."""
    def made(r):
        units = [max(8, min(384, 8 * round(384 * min(1.0, w * r) / 8))) for w in weights]
        keep_h = "[" + ", ".join(f"{h}/3" for h in heads) + "]"
        keep_u = "[" + ", ".join(f"{u}/384" for u in units) + "]"
        plan = planned(base, spec(base, PASSES_TEXT.replace("KEEP_H", f"keep = {keep_h}, ")
                                  .replace("KEEP_U", f"keep = {keep_u}, ")), "drawn")
        program = compressed(plan, original, plan.passes)
        return units, program, macs(program.graph, original.input) <= limit

    units, program, fits = made(0.0)
    if not fits:
        return None
    low, high, best = 0.0, 1.0 / min(weights), (units, program)
    for _ in range(10):
        middle = (low + high) / 2
        units, program, fits = made(middle)
        if fits:
            low, best = middle, (units, program)
        else:
            high = middle
    return best


def chosen_text(record: dict) -> str:
    from evc.passes.budget import fragment

    return "; ".join(f"{c['pass']} {fragment(c)}" for c in record["chosen"])


def teacher_module(base: Path):
    """The task's ViT as timm builds it, with the trained weights (`<task>_vit.safetensors` beside its spec):
    what Torch-Pruning prunes."""
    model = prepare.digits_vit()
    from safetensors.torch import load_file

    model.load_state_dict(load_file(base.with_name(f"{base.stem}_vit.safetensors")))
    return model.eval()


def latency(work: Path) -> None:
    """A latency budget on the cpu target: the chosen model timed against the budget."""
    import json
    import subprocess

    text = spec(DIGITS / "digits.evc", "    budget { latency = 60%, on = cpu, data = train }\n"
                + PASSES_TEXT.replace("KEEP_H", "").replace("KEEP_U", ""))
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
