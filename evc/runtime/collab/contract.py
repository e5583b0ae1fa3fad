"""collab.json: what a decomposed bundle holds, as the runtime that serves its parts reads it.

    {"version": 1,
     "input": {"name": "input", "shape": [3, 32, 32], "dtype": "float32"},
     "parts": [{"index": 0, "model": "part0.onnx", "output_dim": 16},
               {"index": 1, "model": "part1.tflite", "output_dim": 24}],
     "fusion": {"model": "fusion.onnx", "degraded_ok": true},
     "deadline_ms": 2000}

Part k (ONNX or TFLite) maps images (B, C, H, W) float32 to features
(B, output_dim). Images may also travel as uint8 pixels, resized and cropped
but not normalised; the part normalises them with `input.mean` and
`input.std`. The fusion (ONNX) maps `tokens`, the parts' features
concatenated in part order, and `present` (B, N), 1 where a part answered and
0 where it did not (its features then zeros), to logits. `degraded_ok` says
the fusion was trained with parts dropped, so an answer without one means
something.

Optional keys: `input.mean`, `input.std`, `input.crop_pct` and
`input.interpolation`, how `evc infer` preprocesses image files (as `evc build`
does its validation images; ImageNet's when left out); a part's `sha256`, which
the server checks its file against and the coordinator the served file;
`input.name` ("input") and `deadline_ms` (2000).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evc.errors import InputError
from evc.spec.plan import ImageInput

FILE = "collab.json"
IMAGE_DTYPES = ("float32", "uint8")
PART_FORMATS = {".onnx": "onnx", ".tflite": "tflite"}
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
_REQUIRED = object()


@dataclass(frozen=True)
class PartEntry:
    index: int
    model: str
    output_dim: int
    sha256: str | None = None

    @property
    def format(self) -> str:
        return PART_FORMATS[Path(self.model).suffix]


@dataclass(frozen=True)
class Collab:
    """A bundle's collab.json, checked."""

    folder: Path
    input_name: str
    input_shape: tuple[int, int, int]
    image: ImageInput  # how image files are preprocessed into that shape
    parts: tuple[PartEntry, ...]
    fusion: str
    degraded_ok: bool
    deadline_ms: float
    peers: tuple[str, ...] = ()  # where the spec placed the parts: evc infer's default --peers

    @property
    def file(self) -> Path:
        return self.folder / FILE

    def model_path(self, name: str, key: str) -> Path:
        """A model file of the bundle; `key` names the collab.json entry that lists it."""
        path = self.folder / name
        if not path.is_file():
            raise InputError(f"{self.file}: {key}: no such file {path}")
        return path

    def images_problem(self, shape: tuple[int, ...], dtype: str) -> str | None:
        """Why images of this shape and dtype are not what the parts take, or None."""
        expected = f"(B, {', '.join(map(str, self.input_shape))}) float32 or uint8"
        if len(shape) != 4 or tuple(shape[1:]) != self.input_shape or shape[0] < 1 or dtype not in IMAGE_DTYPES:
            return f"expected images of shape {expected}, received {tuple(shape)} {dtype}"
        return None

    def normalised(self, images: np.ndarray) -> np.ndarray:
        """Images as the parts take them: uint8 pixels scaled to [0, 1] and normalised by the mean and std, in
        float32 as timm's ToTensor and Normalize do (bit for bit); float32 images as they are."""
        if images.dtype != np.uint8:
            return images
        mean, std = (np.asarray(v, np.float32)[:, None, None] for v in (self.image.mean, self.image.std))
        return (images.astype(np.float32) / np.float32(255) - mean) / std


def read(bundle: Path) -> Collab:
    """The bundle's collab.json, every key checked; an error names the key at fault."""
    path = Path(bundle) / FILE
    if not Path(bundle).is_dir():
        raise InputError(f"no such bundle folder: {bundle}")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{bundle} is not a decomposed bundle: it has no {FILE}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
    keys = _Keys(path)
    top = keys.table(data, "")
    keys.get(top, "version", "", "1", lambda v: v == 1)
    image = keys.table(keys.get(top, "input", "", "a table"), "input")
    shape = tuple(keys.get(image, "shape", "input.", "a list of 3 positive integers (C, H, W)",
                           lambda v: isinstance(v, list) and len(v) == 3 and all(_positive_int(x) for x in v)))
    keys.get(image, "dtype", "input.", '"float32"', lambda v: v == "float32")
    parts = keys.get(top, "parts", "", "a non-empty list", lambda v: isinstance(v, list) and v)
    fusion = keys.table(keys.get(top, "fusion", "", "a table"), "fusion")
    return Collab(
        folder=Path(bundle),
        input_name=keys.get(image, "name", "input.", "a string", _string, "input"),
        input_shape=shape,
        image=_image_input(keys, image, shape),
        parts=tuple(_part(keys, entry, k) for k, entry in enumerate(parts)),
        fusion=keys.get(fusion, "model", "fusion.", "the name of an .onnx file", _suffix(".onnx")),
        degraded_ok=keys.get(fusion, "degraded_ok", "fusion.", "true or false", lambda v: isinstance(v, bool)),
        deadline_ms=float(keys.get(top, "deadline_ms", "", "a positive number of milliseconds", _positive, 2000)),
        peers=tuple(keys.get(top, "peers", "", f"a list of {len(parts)} \"HOST:PORT\" strings, one per part",
                             lambda v: isinstance(v, list) and len(v) == len(parts) and all(map(_string, v)), [])),
    )


def write(folder: Path, image: ImageInput, parts: list[tuple[str, int]], fusion: str, degraded_ok: bool,
          deadline_ms: float = 2000) -> None:
    """collab.json for artifacts in `folder`: `parts` as (file, output_dim) in part order, each file's
    sha256 taken from the file."""
    from evc.keys import file_digest

    record = {
        "version": 1,
        "input": {"name": "input", "shape": [3, image.height, image.width], "dtype": "float32",
                  "mean": list(image.mean), "std": list(image.std), "crop_pct": image.crop_pct,
                  "interpolation": image.interpolation},
        "parts": [{"index": k, "model": model, "output_dim": width, "sha256": file_digest(folder / model)}
                  for k, (model, width) in enumerate(parts)],
        "fusion": {"model": fusion, "degraded_ok": degraded_ok},
        "deadline_ms": deadline_ms,
    }
    (folder / FILE).write_text(json.dumps(record, indent=2) + "\n")


def bundle_identity(folder: Path) -> str:
    """What says two copies of a bundle are one build: the sha256 of its manifest.json (which records every file's),
    or of its collab.json for a folder without one."""
    from evc.keys import file_digest
    from evc.layout import MANIFEST

    manifest = folder / MANIFEST
    return file_digest(manifest if manifest.is_file() else folder / FILE)


def place(folder: Path, peers: list[str]) -> None:
    """Record in `folder`'s collab.json where each part is served: `evc infer`'s default --peers."""
    record = json.loads((folder / FILE).read_text())
    (folder / FILE).write_text(json.dumps({**record, "peers": list(peers)}, indent=2) + "\n")


def _part(keys: _Keys, entry, k: int) -> PartEntry:
    where = f"parts[{k}]."
    entry = keys.table(entry, f"parts[{k}]")
    keys.get(entry, "index", where, f"{k} (parts are listed in order, from 0)", lambda v: v == k and _int(v))
    return PartEntry(
        index=k,
        model=keys.get(entry, "model", where, "the name of an .onnx or .tflite file", _suffix(*PART_FORMATS)),
        output_dim=keys.get(entry, "output_dim", where, "a positive integer", _positive_int),
        sha256=keys.get(entry, "sha256", where, "64 hex digits", _sha256, None),
    )


def _image_input(keys: _Keys, image: dict, shape: tuple[int, int, int]) -> ImageInput:
    defaults = ImageInput(shape[1], shape[2])
    rgb = (f"a list of {shape[0]} numbers", lambda v: isinstance(v, list) and len(v) == shape[0]
           and all(_number(x) for x in v))
    return ImageInput(
        height=shape[1], width=shape[2],
        mean=tuple(keys.get(image, "mean", "input.", *rgb, list(defaults.mean))),
        std=tuple(keys.get(image, "std", "input.", rgb[0], lambda v: rgb[1](v) and all(x > 0 for x in v),
                           list(defaults.std))),
        crop_pct=keys.get(image, "crop_pct", "input.", "a number in (0, 1]", lambda v: _number(v) and 0 < v <= 1,
                          defaults.crop_pct),
        interpolation=keys.get(image, "interpolation", "input.", f"one of {', '.join(INTERPOLATIONS)}",
                               lambda v: v in INTERPOLATIONS, defaults.interpolation),
    )


class _Keys:
    """Reads keys of one JSON file; an error names the file and the key."""

    def __init__(self, path: Path):
        self.path = path

    def get(self, table: dict, key: str, where: str, expected: str, ok=lambda v: True, default=_REQUIRED):
        if key not in table:
            if default is _REQUIRED:
                raise InputError(f"{self.path}: {where}{key}: missing; expected {expected}")
            return default
        value = table[key]
        if not ok(value):
            raise InputError(f"{self.path}: {where}{key}: expected {expected}, got {json.dumps(value)}")
        return value

    def table(self, value, key: str) -> dict:
        if not isinstance(value, dict):
            raise InputError(f"{self.path}: {key or 'the file'}: expected a table ({{...}}), got {json.dumps(value)}")
        return value


def _int(v) -> bool:
    return type(v) is int  # not bool


def _positive_int(v) -> bool:
    return _int(v) and v > 0


def _number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _positive(v) -> bool:
    return _number(v) and v > 0


def _string(v) -> bool:
    return isinstance(v, str) and bool(v)


def _sha256(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _suffix(*suffixes: str):
    return lambda v: _string(v) and Path(v).suffix in suffixes
