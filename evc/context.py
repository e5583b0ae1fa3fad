"""What a plug-in may ask of the build: the one door from passes and formats to the spec.

    ctx.images("calib")             # a data block's images, preprocessed as the model expects
    ctx.dataset("train", train=True)
    ctx.model("deit_base")          # a teacher model block, loaded; "original" is the model as loaded
    ctx.input, ctx.model_name, ctx.random_weights, ctx.evaluate_data

A pass gets a `PassContext`, which adds what concerns the pass itself: its
per-layer values, errors at its keys, what it found, a workspace in the cache.
Plug-ins never see the Plan.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from evc.errors import SpecError
from evc.spec.params import Invalid, per_layer
from evc.spec.plan import ImageInput, PassPlan, Plan


class Context:
    def __init__(self, plan: Plan, progress=None, original=None, image: ImageInput | None = None):
        self._plan = plan
        self.progress = progress
        self._original = original  # the Program as loaded, before any pass
        self._image = image or (original.input if original is not None else None)

    @property
    def input(self) -> ImageInput:
        """The model's input as loaded: `image(...)`, with the model's data config where the spec left values out."""
        return self._image

    @property
    def model_name(self) -> str:
        return self._plan.model.name

    @property
    def random_weights(self) -> bool:
        """True when the model block names no weights: its outputs mean nothing, so accuracy gates stand down."""
        return self._plan.model.random_init

    @property
    def evaluate_data(self) -> str | None:
        """The `evaluate` block's data, or None without one."""
        return self._plan.evaluate and self._plan.evaluate.data

    def images(self, data: str) -> np.ndarray:
        """A data block's images, preprocessed as the model expects (N×3×H×W float32)."""
        from evc.model.data import load_images

        return load_images(self._plan.data[data], self.input)

    def labelled(self, data: str) -> tuple[np.ndarray, np.ndarray | None]:
        """A data block's images and their class indices (None where it has no class subfolders)."""
        from evc.model.data import load_labelled

        return load_labelled(self._plan.data[data], self.input)

    def dataset(self, data: str, train: bool = False, smallest: float = 0.08):
        """A data block as a lazy dataset of (image, label); `train` applies timm's training transform, its
        random crops down to `smallest` of the image."""
        from evc.model.data import dataset

        return dataset(self._plan.data[data], self.input, train, smallest)

    def model(self, name: str):
        """The nn.Module of a teacher: `original` (the model as loaded) or another model block, loaded."""
        if name == "original":
            return self._original.graph
        from evc.ir.outputs import OneOutput
        from evc.model.load import load_model

        teacher = self._plan.teachers[name]
        with self.progress.stage(f"load teacher {name}"):  # returning the one output it is distilled from
            return OneOutput(load_model(teacher, self._plan.path.parent, self._plan), teacher.output, name)


class PassContext(Context):
    """A Context for one pass of the compress block."""

    def __init__(self, plan: Plan, pass_plan: PassPlan, original=None, key: str = "", cache=None, progress=None):
        super().__init__(plan, progress, original)
        self._pass = pass_plan
        self.key = key  # the key of the program this pass makes: what its own cache entries are keyed by
        self._cache = cache  # None where the build may not write (evc explain, torchrun ranks but 0)
        self.found: dict = {}  # what the pass chose, for the manifest and `evc explain`

    def per_layer(self, key: str, depth: int) -> tuple:
        """The pass's `key` for each of `depth` blocks; a list of the wrong length is a spec error."""
        try:
            return per_layer(self._pass.params[key], depth)
        except Invalid as e:
            raise self._plan.error(e.span, f"{self._pass.name}: {key}: {e.message}") from None

    def workspace(self) -> Path | None:
        """A folder in the cache that this pass may keep files in across interrupted builds (checkpoints);
        None where this build writes nothing."""
        if self._cache is None:
            return None
        folder = self._cache.root / "work" / self.key
        if self._cache.fresh:
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def report(self, key: str, value) -> None:
        """Record a value the pass chose (a schedule it searched for), ready to paste as `key`."""
        self.found[key] = value

    def warn(self, message: str) -> None:
        """Tell the user something the pass did instead of what they may expect (it left the model as is)."""
        if self.progress is not None:
            self.progress.warn(f"{self._pass.name}: {message}")

    def error(self, key: str, message: str) -> SpecError:
        """A spec error at this pass's `key` (or the pass itself), found once the model is known."""
        return self._plan.error(self._pass.spans.get(key), f"{self._pass.name}: {message}")
