"""The model's input, resolved: what `image(...)` leaves out comes from the weights' own data config.

    config = data_config(module, model_plan, spec_dir)   # the values the model's config gives, and their source
    image = resolve(model_plan.input, config, "deit")    # an ImageInput: the spec's values, else the config's
    differences(model_plan.input, config)                # the spec's values that the config disagrees with

The config comes from the first of these that applies:

- `weights = hub("timm/deit_tiny_patch16_224.fb_in1k")`: timm's pretrained_cfg for that tag,
  the preprocessing those very weights were trained with;
- a model that carries a timm pretrained_cfg (every `timm(...)` model):
  `timm.data.resolve_data_config({}, model=module)`;
- a Hugging Face model folder: its `preprocessor_config.json` (`preprocessor_config(folder)`);
- otherwise timm's ImageNet defaults, as evc has always used.

The size is the model's own where it declares one (a timm ViT's patch_embed.img_size,
which follows `img_size = ...`), else the config's. Nothing here runs at check time:
the Plan keeps what the spec gave, and the load stage resolves it here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from evc.errors import InputError
from evc.model.hf import hf_files
from evc.spec.plan import HubWeights, ImageInput, ImageSpec, ModelPlan

NORMALISATION = ("mean", "std", "crop_pct", "interpolation")
# timm's defaults (timm.data.constants), for a model that declares no config.
DEFAULTS = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop_pct": 0.875,
            "interpolation": "bicubic"}
# PIL's resampling filters, as preprocessor_config.json numbers them (PIL.Image.Resampling).
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class DataConfig:
    """Values a model's config gives (height, width, mean, std, crop_pct, interpolation) and where each is from."""

    values: dict = field(default_factory=dict)
    origin: dict = field(default_factory=dict)

    @classmethod
    def of(cls, values: dict, source: str) -> DataConfig:
        values = {k: v for k, v in values.items() if v is not None}
        return cls(values, dict.fromkeys(values, source))

    def under(self, other: DataConfig) -> DataConfig:
        """This config, with `other`'s values where this one has none."""
        return DataConfig({**other.values, **self.values}, {**other.origin, **self.origin})


def model_input(model: ModelPlan, module, spec_dir: Path, warn=None) -> ImageInput:
    """The ImageInput a loaded model takes; `warn` (if given) hears where the spec differs from the config
    published with the weights (a Hub checkpoint's, a Hugging Face folder's). A checkpoint file of one's own
    has no config but what the spec says, so timm's defaults for the architecture do not judge it."""
    config = data_config(module, model, spec_dir)
    published = isinstance(model.weights, HubWeights) or model.source.kind == "hf"
    for message in differences(model.input, config) if warn and published else ():
        warn(f"model '{model.name}': {message}")
    return resolve(model.input, config, model.name)


def data_config(module, model: ModelPlan, spec_dir: Path) -> DataConfig:
    """The data config of a loaded model, from the first source that has one (see the module's docstring)."""
    config = DataConfig.of(DEFAULTS, "default (ImageNet)")
    if hasattr(module, "pretrained_cfg"):
        config = timm_config(module.pretrained_cfg, "timm pretrained_cfg").under(config)
    if model.source.kind == "hf":  # the spec's folder, or the repository's cached snapshot
        folder = hf_files(model.source.name, dict(model.source.kwargs), spec_dir)
        config = (preprocessor_config(folder) or DataConfig()).under(config)
    if isinstance(model.weights, HubWeights):
        config = hub_tag_config(model.weights).under(config)
    return _own_size(module).under(config)


def timm_config(pretrained_cfg: dict, source: str) -> DataConfig:
    """A timm pretrained_cfg's data config, as timm's own transforms read it."""
    from timm.data import resolve_data_config

    resolved = resolve_data_config(pretrained_cfg=dict(pretrained_cfg))
    _, height, width = resolved["input_size"]
    return DataConfig.of({"height": height, "width": width, **{k: resolved[k] for k in NORMALISATION}}, source)


def hub_tag_config(weights: HubWeights) -> DataConfig:
    """For `hub("timm/deit_tiny_patch16_224.fb_in1k")`, timm's pretrained_cfg of that tag; empty for others."""
    from timm.models import get_pretrained_cfg

    org, _, name = weights.repo.partition("/")
    try:
        cfg = get_pretrained_cfg(name, allow_unregistered=True) if org == "timm" else None
    except RuntimeError:  # a model timm knows, with a tag it does not
        cfg = None
    return timm_config(cfg.to_dict(), f"timm pretrained_cfg of {name}") if cfg is not None else DataConfig()


def preprocessor_config(folder: Path) -> DataConfig | None:
    """The data config in a Hugging Face model folder's preprocessor_config.json; None if it has none.

        preprocessor_config(Path("models/vit-base")).values
        # {"height": 224, "width": 224, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 1.0, ...}

    A processor that resizes to `size` and centre-crops `crop_size` is crop_pct = crop / size, as timm
    counts it; one that only resizes is crop_pct 1.
    """
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    resized = _hf_size(raw.get("size"))
    cropped = _hf_size(raw.get("crop_size")) if raw.get("do_center_crop") else None
    height, width = cropped or resized or (None, None)
    crop_pct = raw.get("crop_pct")
    if crop_pct is None and resized:
        crop_pct = min(cropped[0] / resized[0], 1.0) if cropped else 1.0
    normalise = raw.get("do_normalize", True)
    return DataConfig.of({"height": height, "width": width, "crop_pct": crop_pct,
                          "mean": _rgb(raw.get("image_mean")) if normalise else (0.0, 0.0, 0.0),
                          "std": _rgb(raw.get("image_std")) if normalise else (1.0, 1.0, 1.0),
                          "interpolation": _RESAMPLE.get(raw.get("resample"))}, path.name)


def _hf_size(size) -> tuple[int, int] | None:
    """(height, width) of a processor's `size`: 224, {"height": 224, "width": 224} or {"shortest_edge": 224}."""
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict) and "height" in size and "width" in size:
        return size["height"], size["width"]
    if isinstance(size, dict) and "shortest_edge" in size:
        return size["shortest_edge"], size["shortest_edge"]
    return None


def _rgb(values) -> tuple[float, float, float] | None:
    if values is None:
        return None
    values = [values] * 3 if isinstance(values, (int, float)) else values
    return tuple(float(v) for v in values)


def _own_size(module) -> DataConfig:
    """The size a model is built for, where it says: timm's PatchEmbed keeps it as img_size."""
    size = getattr(getattr(module, "patch_embed", None), "img_size", None)
    if not (isinstance(size, (tuple, list)) and len(size) == 2):
        return DataConfig()
    return DataConfig.of({"height": int(size[0]), "width": int(size[1])}, "model (patch_embed.img_size)")


def resolve(given: ImageSpec, config: DataConfig, model: str) -> ImageInput:
    """The spec's values where it gave them, the config's elsewhere; each value's origin recorded."""
    values, origin = {}, {}
    for key in ("height", "width", *NORMALISATION):
        spec_value = getattr(given, key)
        values[key] = spec_value if spec_value is not None else config.values.get(key)
        origin[key] = "spec" if spec_value is not None else config.origin.get(key)
    if values["height"] is None or values["width"] is None:
        raise InputError(f"model '{model}': image() gives no size and the model declares none: "
                         "write image(height, width)")
    size = origin.pop("height")
    origin.pop("width")
    return ImageInput(**values, origin=(("size", size), *origin.items()))


def differences(given: ImageSpec, config: DataConfig) -> list[str]:
    """A line for each value the spec gives that a real config (not the defaults) gives otherwise."""
    lines = []
    for key in NORMALISATION:
        mine, theirs = getattr(given, key), config.values.get(key)
        source = config.origin.get(key, "")
        if mine is None or source.startswith("default") or _same(mine, theirs):
            continue
        lines.append(f"image({key} = {_show(mine)}) differs from the weights' {_show(theirs)} ({source}); "
                     "the spec's value is used")
    return lines


def _same(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    a, b = (tuple(x) if isinstance(x, (tuple, list)) else (x,) for x in (a, b))
    return len(a) == len(b) and all(abs(x - y) < 1e-6 for x, y in zip(a, b))


def _show(value) -> str:
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(f"{v:g}" for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)
