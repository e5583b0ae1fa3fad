"""Image files as `evc infer` reads them: a batch per file, in the shape collab.json gives.

PNG, JPEG and whatever else Pillow reads are resized and cropped as the eval
transform `evc build` validates with (resize by crop_pct, centre crop, with
collab.json's crop_pct and interpolation) and kept as uint8 pixels: they go to
the parts in a quarter of the bytes, and each part normalises them
(`Collab.normalised`, bit for bit the transform's ToTensor and Normalize). A
`.npy` file holds a batch (B, C, H, W), or one image (C, H, W): float, already
preprocessed, or uint8 pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evc.errors import InputError
from evc.runtime.collab.contract import Collab


def read_batch(path: Path, collab: Collab) -> np.ndarray:
    """(B, C, H, W) for one file: float32, or uint8 pixels."""
    if not path.is_file():
        raise InputError(f"no such image file: {path}")
    batch = _npy(path) if path.suffix.lower() == ".npy" else _picture(path, collab)[None]
    if batch.ndim == 3:
        batch = batch[None]
    problem = collab.images_problem(batch.shape, str(batch.dtype))
    if problem:
        raise InputError(f"{path}: {problem}")
    return batch


def _npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path} as a NumPy array: {e}") from None
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"{path}: holds {array.dtype}; expected preprocessed float32 images or uint8 pixels "
                         "(B, C, H, W)")
    return array.astype(np.float32)


def _picture(path: Path, collab: Collab) -> np.ndarray:
    from timm.data.transforms import MaybeToTensor
    from torchvision.transforms import Compose, Normalize

    from evc.model.data import eval_transform, read_rgb

    if collab.input_shape[0] != 3:
        raise InputError(f"{path}: {collab.file}'s parts take {collab.input_shape[0]} channels, not an RGB image; "
                         "give them as a .npy array")
    resize_and_crop = Compose([t for t in eval_transform(collab.image).transforms
                               if not isinstance(t, (MaybeToTensor, Normalize))])
    return np.asarray(resize_and_crop(read_rgb(path)), dtype=np.uint8).transpose(2, 0, 1)
