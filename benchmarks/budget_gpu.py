"""The budget's recovery judge on the GPU against the CPU: the same candidates, trained alike, scored alike.

    python benchmarks/budget_gpu.py [--steps 120]      # on a machine with a CUDA GPU

Candidates are ViTs of one shape (DeiT-Tiny's width, 6 blocks, 32×32 in patches of 4) at three widths of
heads and MLP, as a budget's allocations would differ. Each is given `--steps`
steps of one recipe (evc.passes.recovery.recovered: the judge a budget runs) on seeded synthetic labelled
images (cross-entropy alone, from initialisation), once with `device = cuda` and once with `device = cpu`, and
scored on held-back images. The table
gives each candidate's loss and top-1 both ways and the time; the ranking must agree.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

from evc.passes.recovery import Job, Split, _workers, recovered
from evc.passes.train import Recipe, Run


class Labelled(torch.utils.data.Dataset):
    """Seeded images whose label is the quadrant that is brightest: a task a ViT learns from its patches."""

    def __init__(self, count: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(count, 3, 32, 32, generator=generator) * 0.5
        self.labels = torch.randint(0, 4, (count,), generator=generator).tolist()
        for image, label in zip(self.images, self.labels):
            row, column = divmod(label, 2)
            image[:, 16 * row:16 * row + 16, 16 * column:16 * column + 16] += 0.6
        self.classes = ["0", "1", "2", "3"]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def vit(heads: int, mlp_ratio: float, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=6, num_heads=heads,
                             embed_dim=64 * heads, mlp_ratio=mlp_ratio, num_classes=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    print(f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}; torch {torch.__version__}; "
          f"workers a budget would use on it: {_workers('auto', 'auto', 6)}\n")
    images = Labelled(2048)
    candidates = {"3 heads, MLP 4x": vit(3, 4.0, 1), "2 heads, MLP 2x": vit(2, 2.0, 2),
                  "1 head, MLP 1x": vit(1, 1.0, 3)}
    results = {}
    for device in ("cuda", "cpu"):
        recipe = Recipe(epochs=4, lr=1e-3, batch=64, alpha=0.0, seed=0, device=device)
        run = Run(None, images, recipe, {})  # cross-entropy alone: the candidates learn the task from scratch
        split = Split.of(run, 0.2)
        for name, model in candidates.items():
            start = time.perf_counter()
            score = recovered(Job(model, run, split, args.steps))
            results[device, name] = (score, time.perf_counter() - start)
    print("| candidate | loss, GPU | loss, CPU | top-1, GPU | top-1, CPU | seconds, GPU | seconds, CPU |")
    print("|---|---|---|---|---|---|---|")
    for name in candidates:
        (g, tg), (c, tc) = results["cuda", name], results["cpu", name]
        print(f"| {name} | {g['loss']:.4f} | {c['loss']:.4f} | {g['top1']:.2%} | {c['top1']:.2%} | {tg:.1f} "
              f"| {tc:.1f} |")
    rank = {d: sorted(candidates, key=lambda n: (-results[d, n][0]["top1"], results[d, n][0]["loss"]))
            for d in ("cuda", "cpu")}
    print(f"\nranking on the GPU: {rank['cuda']}\nranking on the CPU: {rank['cpu']}\n"
          f"{'the same' if rank['cuda'] == rank['cpu'] else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
