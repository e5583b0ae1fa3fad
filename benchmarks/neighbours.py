"""Can a judge on one split foresee the scores on another? The best uniform ratios and their neighbours.

    .venv/bin/python benchmarks/neighbours.py [--seeds 2] [--tasks textures digits] [--held-out 100]

The tasks and models of benchmarks/budget.py. For textures at 50% of the MACs and digits at 35%, the best
uniform ratios (heads 3/3 and 2/3 in every block: benchmarks/budget.py --random) and each neighbour that
`refine` judges (one block's heads one fewer or one more, the MLPs at one share again, bisected to the budget),
and the allocations --random found best there, are each finetuned as budget.py finetunes (10 epochs, once per
seed), then scored on `tune` (the images the search judges on) and on `val` (those the benchmark scores on).
Each lead over the uniform ratios is printed seed by seed: on tune, with its paired standard error over the
images; the recipe's loss on tune; and on val, with its SE; then the correlation over the allocations
of the leads on tune (top-1 and loss) with those on val.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import budget as bench  # noqa: E402

from evc.passes.train import Recipe, distill, held_out_scores  # noqa: E402

CASES = {  # (task, share of the MACs): (the best uniform ratios' heads, allocations --random found best there)
    ("textures", 0.5): ([3] * 6, [([2, 3, 3, 3, 3, 3], [80, 64, 72, 72, 72, 88]),
                                  ([2, 3, 3, 2, 3, 3], [88, 88, 80, 96, 88, 96])]),
    ("digits", 0.35): ([2] * 6, [([2, 2, 2, 2, 1, 3], [56, 56, 48, 40, 40, 56]),
                                 ([2, 1, 2, 2, 2, 2], [64, 72, 72, 56, 64, 56])]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--tasks", nargs="+", default=["textures", "digits"], choices=["textures", "digits"])
    parser.add_argument("--held-out", type=int, default=100, metavar="N",
                        help="textures: N tune and N val images a class (the ViT and its training images unchanged)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    for (name, budget), (heads, found) in CASES.items():
        if name not in args.tasks:
            continue
        base = bench.task(name, work, args.held_out)
        plan = bench.parse_and_check(base.read_text(), base)
        original, _ = bench.Stages(plan, bench.Cache(work / ".cache"), bench.Progress()).loaded
        whole = bench.macs(original.graph, original.input)
        train, val, tune = (bench.dataset(plan.data[k], original.input) for k in ("train", "val", "tune"))
        teacher = original.graph.eval()
        allocations = [("uniform", heads, [1.0] * 6)]
        for block in range(6):
            for step in (-1, 1):
                moved = list(heads)
                moved[block] += step
                if 1 <= moved[block] <= 3:
                    allocations.append((f"block {block} {step:+d}", moved, [1.0] * 6))
        allocations += [(f"--random's {h}", h, [u / np.mean(units) for u in units]) for h, units in found]
        rows = [scored(label, h, w, base, original, teacher, budget * whole, train, tune, val, args.seeds)
                for label, h, w in allocations]
        first = rows[0][-1]
        print(f"\n### {name}, macs = {budget:.0%}: lead over uniform ratios, seed by seed\n")
        print("| allocation | heads | MLP units | tune: top-1 (SE) | tune: loss, × 100 | val: top-1 |")
        print("|---|---|---|---|---|---|")
        for label, h, units, runs in rows:
            def each(f):
                return " / ".join(f(run, ref) for run, ref in zip(runs, first))

            def paired(k):  # the lead in top-1 on split k, in points, and its standard error over the images
                return each(lambda r, q: f"{100 * (r[k] - q[k]).mean():+.2f} "
                                         f"({100 * (r[k] - q[k]).std(ddof=1) / np.sqrt(len(r[k])):.2f})")

            tune_top1, val_top1 = paired(0), paired(2)
            tune_loss = each(lambda r, q: f"{100 * (r[1] - q[1]).mean():+.3f}")
            print(f"| {label} | {h} | {units} | {tune_top1} | {tune_loss} | {val_top1} |", flush=True)
        leads = np.array([[np.mean([(r[k] - q[k]).mean() for r, q in zip(runs, first)]) for k in (0, 1, 2)]
                          for *_, runs in rows[1:]])
        print(f"\nOver the {len(leads)} allocations, the correlation of the lead on val (mean of the seeds) "
              f"with the top-1 lead on tune: {np.corrcoef(leads[:, 0], leads[:, 2])[0, 1]:+.2f}; with the "
              f"loss lead on tune: {np.corrcoef(leads[:, 1], leads[:, 2])[0, 1]:+.2f} (negative foresees: "
              f"less loss)\n", flush=True)


def scored(label, heads, weights, base, original, teacher, limit, train, tune, val, seeds):
    """(label, heads, MLP units, [(right on tune, loss on tune, right on val) per seed]) of one allocation
    finetuned."""
    units, program = bench.allocated(base, original, limit, heads, weights)
    recipe = Recipe(epochs=10, lr=5e-4, batch=64, alpha=0.9, temperature=1.0, device="auto")
    start, runs = time.perf_counter(), []
    for seed in range(seeds):
        student = distill(copy.deepcopy(program.graph), teacher, train, replace(recipe, seed=seed),
                          progress=lambda *_: None).student.eval()
        loss, right = held_out_scores(student, teacher, tune, recipe)
        _, right_val = held_out_scores(student, teacher, val, recipe)
        runs.append((right.double().numpy(), loss.double().numpy(), right_val.double().numpy()))
    print(f"{label}: heads {heads}, MLP {units} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return label, heads, units, runs


if __name__ == "__main__":
    main()
