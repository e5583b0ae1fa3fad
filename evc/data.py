"""Images for calibration and validation, preprocessed as the model expects.

A `data` block names either a seeded set of synthetic images or a folder of
images, which go through timm's eval transforms (resize, centre crop,
normalise) built from the model's `input = image(...)`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evc.errors import InputError
from evc.plan import DataPlan, ImageInput

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm"}

# Parity inputs when a target names no `validate` data: enough to see a
# top-1 disagreement, few enough to keep a build fast.
DEFAULT_VALIDATION = DataPlan("validation", synthetic=8, images=None, seed=0, limit=None)


def data_identity(data: DataPlan) -> dict:
    """What a data block's images are, for cache keys: its settings and, for a folder, its files' names,
    sizes and modification times."""
    from evc.cache import canonical

    identity = canonical(data)
    if data.images is not None:
        identity["files"] = [(str(p.relative_to(data.images)), p.stat().st_size, p.stat().st_mtime_ns)
                             for p in sorted(data.images.rglob("*")) if p.is_file()]
    return identity


def image_files(folder: Path, limit: int | None = None) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {folder}")
    return files[:limit] if limit else files


def load_images(data: DataPlan, image: ImageInput) -> np.ndarray:
    """N×3×H×W float32, normalised with the model's mean and std."""
    if data.synthetic is not None:
        rng = np.random.default_rng(data.seed)
        pixels = rng.random((data.synthetic, 3, image.height, image.width), dtype=np.float32)
        return _normalise(pixels, image)
    return np.stack([_preprocess(p, image) for p in image_files(data.images, data.limit)])


def eval_transform(image: ImageInput):
    from timm.data import create_transform

    return create_transform(
        input_size=(3, image.height, image.width),
        interpolation=image.interpolation,
        mean=image.mean,
        std=image.std,
        crop_pct=image.crop_pct,
        is_training=False,
    )


def _preprocess(path: Path, image: ImageInput) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            rgb = picture.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(f"cannot read image {path}: {e}") from None
    return eval_transform(image)(rgb).numpy().astype(np.float32)


def _normalise(pixels: np.ndarray, image: ImageInput) -> np.ndarray:
    mean = np.asarray(image.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(image.std, dtype=np.float32).reshape(1, 3, 1, 1)
    return (pixels - mean) / std
