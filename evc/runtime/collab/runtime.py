"""A decomposed bundle's models, run here: each part, the fusion, and all of them in one process.

    logits = local_infer(Path("build/devit/collab"), images)                # every part
    logits = local_infer(Path("build/devit/collab"), images, missing=(1,))  # as if part 1 had not answered

Parts and fusion run one image at a time, as `Runtime.run` does and as a
device sees them: an artifact exported at batch 1 takes any batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from evc.errors import InputError, first_line
from evc.runtime.collab.contract import Collab, read

TOKENS, PRESENT = "tokens", "present"


def part_model(collab: Collab, k: int, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """features(images) for part k, in its format's runtime here; checked once on a blank image."""
    from evc.registry import FORMATS

    entry = collab.parts[k]
    path = collab.model_path(entry.model, f"parts[{k}].model")
    try:
        run = FORMATS[entry.format].plugin.session(path, threads)
    except Exception as e:  # each runtime raises its own type for a file it cannot load
        raise InputError(f"cannot load part {k}'s model {path}: {first_line(e)}") from None

    def features(images: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(run(x[None])) for x in images])

    blank = _try(features, path, np.zeros((1, *collab.input_shape), np.float32), f"images {(1, *collab.input_shape)}")
    if blank.shape != (1, entry.output_dim) or blank.dtype != np.float32:
        raise InputError(f"{path} gives {blank.dtype} of shape {blank.shape} for one blank image; collab.json's "
                         f"parts[{k}] says float32 of shape (1, {entry.output_dim})")
    return features


class Fusion:
    """logits for the parts' features (None for a part that did not answer), in ONNX Runtime here."""

    def __init__(self, collab: Collab, threads: int | None = None):
        import onnxruntime as ort

        self.dims = [p.output_dim for p in collab.parts]
        path = collab.model_path(collab.fusion, "fusion.model")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own exception types
            raise InputError(f"cannot load the fusion {path}: {first_line(e)}") from None
        names = [i.name for i in self.session.get_inputs()]
        if sorted(names) != [PRESENT, TOKENS]:
            raise InputError(f"{path}: the fusion takes inputs {names}; it must take exactly "
                             f"'{TOKENS}' (B, {sum(self.dims)}) and '{PRESENT}' (B, {len(self.dims)})")
        blank = _try(self, path, [np.zeros((1, d), np.float32) for d in self.dims],
                     f"{TOKENS} (1, {sum(self.dims)}) and {PRESENT} (1, {len(self.dims)})")
        if blank.ndim != 2 or len(blank) != 1 or blank.dtype != np.float32:
            raise InputError(f"{path} gives {blank.dtype} of shape {blank.shape} for one blank input; "
                             "a fusion gives logits (1, classes) float32")

    def __call__(self, features: list[np.ndarray | None]) -> np.ndarray:
        batch = next(len(f) for f in features if f is not None)
        tokens = np.concatenate([np.zeros((batch, d), np.float32) if f is None else f
                                 for f, d in zip(features, self.dims)], axis=1)
        present = np.asarray([[f is not None for f in features]] * batch, dtype=np.float32)
        return np.concatenate([self.session.run(None, {TOKENS: t[None], PRESENT: p[None]})[0]
                               for t, p in zip(tokens, present)])


def local_infer(bundle: Path, images: np.ndarray, missing: tuple[int, ...] = ()) -> np.ndarray:
    """The bundle's logits for `images`, every part and the fusion run in this process; the parts in
    `missing` left out as if they had not answered. What served parts must reproduce exactly."""
    collab = read(bundle)
    images = checked_images(collab, images)
    images = collab.normalised(images)
    features = [None if k in missing else part_model(collab, k)(images) for k in range(len(collab.parts))]
    if all(f is None for f in features):
        raise InputError("local_infer: every part is missing; at least one must answer")
    return Fusion(collab)(features)


def checked_images(collab: Collab, images) -> np.ndarray:
    images = np.asarray(images)
    problem = collab.images_problem(images.shape, str(images.dtype))
    if problem:
        raise InputError(f"{collab.file}: {problem}")
    return images


def _try(model, path: Path, blank, shapes: str) -> np.ndarray:
    """`model` run once on a blank input, so that a model that does not fit collab.json is named at load."""
    try:
        return np.asarray(model(blank))
    except Exception as e:  # each runtime raises its own type for an input its model does not take
        raise InputError(f"{path} does not run on what collab.json says it takes, {shapes}: {first_line(e)}") from None
