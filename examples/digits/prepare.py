"""Write scikit-learn's handwritten digits as image folders and train a small ViT on them.

    python examples/digits/prepare.py                 # data/train, data/val, digits_vit.safetensors
    python examples/digits/prepare.py --epochs 5      # quicker, a little less accurate

The 1797 8×8 digits are upscaled to 32×32 RGB PNGs in the ImageFolder layout
(one subfolder per class), 80% for training and 20% for validation, split per
class with a fixed seed. The ViT (timm's VisionTransformer: patch 4, width 96,
depth 6, 3 heads) trains with plain PyTorch on the same pixels the spec's
`input = image(...)` gives evc (ImageNet's mean and std, crop_pct 1), and is
saved as a safetensors checkpoint for `digits.evc` to load. A checkpoint of
one's own carries no preprocessing, so the spec states what it was trained with.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits

HERE = Path(__file__).resolve().parent
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # as digits.evc's image(...) gives them


def digits_vit() -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=96,
                             depth=6, num_heads=3, num_classes=10)


def write_folders(root: Path, val_share: float = 0.2, seed: int = 0) -> None:
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        index = rng.permutation(np.flatnonzero(digits.target == label))
        cut = round(len(index) * val_share)
        for part, chosen in (("val", index[:cut]), ("train", index[cut:])):
            folder = root / part / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                gray = (digits.images[i] * 255 / 16).astype(np.uint8)
                Image.fromarray(gray).convert("RGB").resize((32, 32), Image.BICUBIC).save(folder / f"{i:04d}.png")


def read_folder(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images normalised as evc's eval transform does at crop_pct 1.0, and their labels."""
    files = sorted(folder.glob("*/*.png"))
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255 for f in files])
    images = ((pixels - MEAN) / STD).transpose(0, 3, 1, 2).astype(np.float32)
    return torch.from_numpy(images), torch.tensor([int(f.parent.name) for f in files])


def train(model, images, labels, epochs: int, lr: float = 1e-3, seed: int = 0) -> None:
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * -(-len(images) // 64)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images))
        for start in range(0, len(images), 64):
            batch = order[start:start + 64]
            shifted = torch.roll(images[batch], shifts=tuple(torch.randint(-2, 3, (2,)).tolist()), dims=(2, 3))
            loss = F.cross_entropy(model(shifted), labels[batch], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()


@torch.no_grad()
def top1(model, images, labels) -> float:
    return float((model(images).argmax(1) == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="where data/ and the checkpoint go")
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    write_folders(args.out / "data")
    torch.manual_seed(0)
    model = digits_vit()
    train(model, *read_folder(args.out / "data" / "train"), epochs=args.epochs)
    print(f"val top-1 {top1(model, *read_folder(args.out / 'data' / 'val')):.2%}")
    save_file(model.state_dict(), args.out / "digits_vit.safetensors")


if __name__ == "__main__":
    main()
