"""Images for calibration, validation and training, preprocessed as the model expects.

A `data` block names either a seeded set of synthetic images or a folder in
one of two layouts:

    train/cat/1.jpg  train/dog/7.png     one subfolder per class: labelled, as torchvision's
                                         ImageFolder labels it (classes sorted by name)
    calib/1.jpg  calib/2.png             images directly in the folder: no labels

Images go through timm's transforms built from the model's `input = image(...)`:

    load_images(data, image)              # N×3×H×W float32, eval transform: calibration, parity
    load_labelled(data, image)            # the same, and the labels (None when unlabelled)
    dataset(data, image, train=True)      # lazy (3×H×W float32 tensor, label or -1) pairs for training

`split = [0.9, 0.1]` with `part = 2` keeps one seeded share of the folder, each
class divided alike; `limit` then keeps the first images of what is left.

An unreadable image stops with an InputError that names it. With `skip_bad =
true` it is left out instead: a `SkippedImage` warning names it, and the
dataset's `skipped` lists it for a caller that reports warnings its own way.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evc.errors import InputError
from evc.spec.plan import DataPlan, ImageInput

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm"}
_SUFFIXES = ", ".join(sorted(IMAGE_SUFFIXES))
UNLABELLED = -1

# Parity inputs when a target names no `validate` data: enough to see a
# top-1 disagreement, few enough to keep a build fast.
DEFAULT_VALIDATION = DataPlan("validation", synthetic=8, images=None, seed=0, limit=None)


class SkippedImage(UserWarning):
    """An unreadable image left out of a `skip_bad = true` data block."""


@dataclass(frozen=True)
class Folder:
    """An `images` folder as scanned: its images in order, each one's label (-1 when unlabelled), its classes."""

    root: Path
    files: tuple[Path, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...] | None


def scan(root: Path) -> Folder:
    """Find a folder's images and its layout; a mixed layout, an empty folder or an empty class is an InputError."""
    if not root.is_dir():  # checked with the spec, but it may have gone since
        raise InputError(f"no such folder of images: {root}")
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    top = [p for p in entries if _is_image(p)]
    by_class = {d.name: image_files(d, recursive=True) for d in entries if d.is_dir()}
    nested = next((files[0] for files in by_class.values() if files), None)
    if top and nested:
        raise InputError(f"{root} mixes images directly in it ({top[0].name}) with images in subfolders "
                         f"({nested.relative_to(root)}): put each class in its own subfolder for labels, "
                         "or every image directly in the folder for none")
    if top:
        return Folder(root, tuple(top), (UNLABELLED,) * len(top), None)
    if nested is None:
        raise InputError(f"no images ({_SUFFIXES}) found in {root} or its subfolders")
    empty = next((name for name, files in by_class.items() if not files), None)
    if empty is not None:
        raise InputError(f"class folder {root / empty} holds no images ({_SUFFIXES}); "
                         "each subfolder of an images folder is a class")
    files = [(f, label) for label, name in enumerate(by_class) for f in by_class[name]]
    return Folder(root, tuple(f for f, _ in files), tuple(label for _, label in files), tuple(by_class))


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """A folder's images in path order; hidden files and folders (`.DS_Store`, `._x.jpg`) are not images."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if _is_image(p) and not any(
        part.startswith(".") for part in p.relative_to(folder).parts))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def classes(data: DataPlan) -> list[str] | None:
    """The class names a folder's labels index, whatever share of it `data` keeps; None when unlabelled."""
    if data.images is None:
        return None
    found = scan(data.images).classes
    return list(found) if found is not None else None


def shares(count: int, split: tuple[float, ...]) -> list[int]:
    """How many of `count` images each share of `split` gets: largest remainders, and at least one each while
    there are enough, so the 10% share of a class of five images is not empty."""
    exact = [f * count for f in split]
    sizes = [math.floor(x) for x in exact]
    if count >= len(split):
        sizes = [max(n, 1) for n in sizes]
    while sum(sizes) < count:
        sizes[max(range(len(sizes)), key=lambda i: exact[i] - sizes[i])] += 1
    while sum(sizes) > count:
        sizes[max((i for i in range(len(sizes)) if sizes[i] > 1), key=lambda i: sizes[i] - exact[i])] -= 1
    return sizes


def share(labels: tuple[int, ...], split: tuple[float, ...], part: int, seed: int) -> list[int]:
    """Indices of share `part` (1-based) of a seeded split, each label's images divided by the fractions.

    The same labels, split and seed give every part the same shuffle, so the
    parts are disjoint and cover the folder. The share comes classes
    interleaved, so that a `limit` keeps their proportions.
    """
    rng = np.random.default_rng(seed)
    by_label = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[label].append(i)
    placed = []
    for label in sorted(by_label):
        members = by_label[label]
        order = rng.permutation(len(members))
        sizes = shares(len(members), split)
        start = sum(sizes[:part - 1])
        mine = [members[j] for j in order[start:start + sizes[part - 1]]]
        placed += [((k + 0.5) / len(mine), label, i) for k, i in enumerate(mine)]
    return [i for *_, i in sorted(placed)]


def _candidates(folder: Folder, data: DataPlan) -> list[tuple[Path, int]]:
    """The folder's images this block may use, in order, before skipping and `limit`."""
    if data.split is None:
        picked = range(len(folder.files))
    else:
        picked = share(folder.labels, data.split, data.part, data.seed)
    return [(folder.files[i], folder.labels[i]) for i in picked]


def _readable(candidates: list[tuple[Path, int]], data: DataPlan) -> tuple[list, list[tuple[Path, str]]]:
    """The first `limit` readable candidates, and the unreadable ones skipped on the way.

    Without skip_bad a header check finds most broken files up front, cheaply
    (~0.1 ms a JPEG); decoding on access names any file it missed. With
    skip_bad each candidate is decoded once here (~2-8 ms), since only a full
    decode finds a truncated JPEG, and a file must be skipped before the
    dataset's length is fixed.
    """
    kept, skipped = [], []
    for path, label in candidates:
        if data.limit and len(kept) == data.limit:
            break
        problem = _problem(path, decode=data.skip_bad)
        if problem is None:
            kept.append((path, label))
        elif data.skip_bad:
            skipped.append((path, problem))
            warnings.warn(f"data '{data.name}': skipped unreadable image {path}: {problem}", SkippedImage)
        else:
            raise InputError(_unreadable(path, problem))
    if not kept:
        what = "every image it selects is unreadable" if skipped else "its share of the split is empty"
        raise InputError(f"data '{data.name}' has no images: {what} ({data.images})")
    return kept, skipped


def _problem(path: Path, decode: bool) -> str | None:
    """Why `path` cannot be read as an image, or None."""
    from PIL import Image

    try:
        with Image.open(path) as picture:
            picture.load() if decode else picture.verify()
    except _pil_errors() as e:
        return _why(e)
    return None


def _read(path: Path):
    """The image at `path` as RGB, read on access."""
    return read_rgb(path, SKIP_BAD)


def read_rgb(path: Path, hint: str = ""):
    """The image at `path` as an RGB PIL image; InputError names it, `hint` after why, if Pillow cannot."""
    from PIL import Image

    try:
        with Image.open(path) as picture:
            return picture.convert("RGB")
    except _pil_errors() as e:
        raise InputError(f"cannot read image {path}: {_why(e)}{hint}") from None


def _pil_errors() -> tuple[type[Exception], ...]:
    """What PIL raises for a file it cannot read: OSError for most, SyntaxError for a broken PNG chunk."""
    from PIL import Image

    return OSError, SyntaxError, ValueError, Image.DecompressionBombError


def _why(error: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):  # its own message repeats the path
        return "not an image PIL can identify"
    return str(error) or type(error).__name__


SKIP_BAD = " (`skip_bad = true` in its data block skips it with a warning)"


def _unreadable(path: Path, problem: str) -> str:
    return f"cannot read image {path}: {problem}{SKIP_BAD}"


class ImageSet:
    """A folder's images as a map-style torch dataset (a DataLoader takes it as it is): item i is (3×H×W float32
    tensor, label), label -1 when unlabelled, read and transformed on access.

    It does not subclass torch's Dataset so that `evc.model.data` loads without
    torch: a cached build never imports it.
    """

    def __init__(self, samples: list[tuple[Path, int]], classes: tuple[str, ...] | None,
                 skipped: list[tuple[Path, str]], transform):
        self.files = [path for path, _ in samples]
        self.labels = [label for _, label in samples]
        self.classes = list(classes) if classes is not None else None
        self.skipped = skipped  # (file, why) for each unreadable image left out under skip_bad
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.transform(_read(self.files[i])), self.labels[i]


class SyntheticSet:
    """`synthetic = N`: seeded uniform pixels, normalised; item i is (3×H×W float32 tensor, -1), made on access."""

    classes = None
    skipped = ()

    def __init__(self, data: DataPlan, image: ImageInput):
        self.count, self.seed = data.synthetic, data.seed
        self.shape = (3, image.height, image.width)
        self.mean = np.asarray(image.mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(image.std, dtype=np.float32).reshape(3, 1, 1)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        import torch

        if not 0 <= i < self.count:
            raise IndexError(i)
        return torch.from_numpy((_synthetic_pixels(self.seed, i, self.shape) - self.mean) / self.std), UNLABELLED


def _synthetic_pixels(seed: int, i: int, shape: tuple[int, int, int]) -> np.ndarray:
    """Image i of `default_rng(seed).random((N, *shape), float32)`, without drawing the ones before it.

    PCG64 makes each float32 from half of one 64-bit draw, low half first, so
    value k comes from draw k // 2: advance there and drop a half if k is odd.
    """
    size = math.prod(shape)
    rng = np.random.default_rng(seed)
    rng.bit_generator.advance(i * size // 2)
    if i * size % 2:
        rng.random(1, dtype=np.float32)
    return rng.random(shape, dtype=np.float32)


def dataset(data: DataPlan, image: ImageInput, train: bool = False, smallest: float = 0.08) -> ImageSet | SyntheticSet:
    """A data block's images, read lazily: timm's eval transform, or with `train` its training transform
    (random crops down to `smallest` of the image).

    Synthetic images are the same either way: augmenting noise teaches nothing.
    """
    if data.synthetic is not None:
        return SyntheticSet(data, image)
    folder = scan(data.images)
    samples, skipped = _readable(_candidates(folder, data), data)
    transform = train_transform(image, smallest) if train else eval_transform(image)
    return ImageSet(samples, folder.classes, skipped, transform)


def load_labelled(data: DataPlan, image: ImageInput) -> tuple[np.ndarray, np.ndarray | None]:
    """N×3×H×W float32 after the eval transform, and N int64 labels (None when unlabelled): for small eval sets."""
    images = dataset(data, image)
    items = [images[i] for i in range(len(images))]
    pixels = np.stack([np.asarray(x, dtype=np.float32) for x, _ in items])
    labels = np.asarray([label for _, label in items], dtype=np.int64) if images.classes is not None else None
    return pixels, labels


def load_images(data: DataPlan, image: ImageInput) -> np.ndarray:
    """N×3×H×W float32, normalised with the model's mean and std."""
    return load_labelled(data, image)[0]


def eval_transform(image: ImageInput):
    """timm's eval transform: resize by crop_pct, centre crop, normalise."""
    from timm.data import create_transform

    return create_transform(input_size=(3, image.height, image.width), interpolation=image.interpolation,
                            mean=image.mean, std=image.std, crop_pct=image.crop_pct, is_training=False)


def train_transform(image: ImageInput, smallest: float = 0.08):
    """timm's training transform, kept modest for fine-tuning a compressed model back: a random resized crop
    (scale `smallest`-1, timm's 0.08 by default, and aspect 3/4-4/3) and a horizontal flip; no colour jitter,
    auto-augment or erasing."""
    from timm.data import create_transform

    return create_transform(input_size=(3, image.height, image.width), interpolation=image.interpolation,
                            mean=image.mean, std=image.std, is_training=True, scale=(smallest, 1.0),
                            color_jitter=None, auto_augment=None, re_prob=0.0)


def fitting_augmentation(image: ImageInput) -> tuple[str, float | None]:
    """What `augment = auto` trains with at this image size: ("none", None) below 64 pixels, where a random
    crop leaves too little of the image and small datasets (digits, CIFAR) are not flip-invariant as photos
    are; ("standard", smallest) above, the crop's smallest share growing as the image shrinks so that it keeps
    as many pixels as timm's 8% of a 224 × 224 image (0.32 at 112, 0.98 at 64)."""
    side = min(image.height, image.width)
    if side < 64:
        return "none", None
    return "standard", min(1.0, round(0.08 * (224 / side) ** 2, 4))
