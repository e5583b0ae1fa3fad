"""The Plan: a checked spec, with every value typed, defaulted and resolved.

Everything after checking works from a Plan. It keeps the spans of the values
a later stage may still reject (a per-layer list against the model's depth),
so that error too points into the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evc.errors import Span, SpecError


@dataclass(frozen=True)
class Source:
    """`timm("deit_tiny_patch16_224")`, `hf("models/vit")` or `python("pkg.module:factory")`, with keyword
    arguments."""

    kind: str
    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    def __str__(self) -> str:
        args = [repr(self.name)] + [f"{k}={v!r}" for k, v in self.kwargs]
        return f"{self.kind}({', '.join(args)})"


@dataclass(frozen=True)
class HubWeights:
    """`hub("timm/deit_tiny_patch16_224.fb_in1k", revision = "main", file = "model.safetensors")`: a checkpoint
    in a Hugging Face Hub repository; without `file`, model.safetensors or else pytorch_model.bin."""

    repo: str
    revision: str = "main"
    file: str | None = None

    def __str__(self) -> str:
        args = [f'"{self.repo}"']
        if self.revision != "main":
            args.append(f'revision = "{self.revision}"')
        if self.file:
            args.append(f'file = "{self.file}"')
        return f"hub({', '.join(args)})"


@dataclass(frozen=True)
class ImageSpec:
    """`image(...)` as the spec wrote it: None where the spec leaves a value to the model's own data config.

    The load stage resolves it, once the model is built, into an ImageInput (`evc.model.preprocess.resolve`).
    """

    height: int | None = None
    width: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    crop_pct: float | None = None
    interpolation: str | None = None


@dataclass(frozen=True)
class ImageInput:
    """The model's input, resolved: an RGB image, NCHW float32, normalised; what Programs, data and targets use."""

    height: int
    width: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    # Where each value came from, as (name, source) pairs: ("mean", "spec"), ("crop_pct", "timm pretrained_cfg").
    origin: tuple[tuple[str, str], ...] = ()

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (1, 3, self.height, self.width)


@dataclass(frozen=True)
class ModelPlan:
    name: str
    source: Source
    input: ImageSpec
    weights: Path | HubWeights | None
    output: str | None = None  # which of several outputs the Program returns (evc.ir.outputs)
    # Each value's span, by key, so that an error found when loading points at it (evc.errors.at_value).
    spans: dict[str, Span] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def random_init(self) -> bool:
        """No checkpoint: no `weights`, and a source that brings none of its own (an hf folder does)."""
        return self.weights is None and self.source.kind != "hf"


@dataclass(frozen=True)
class DataPlan:
    """A `data` block: synthetic images or a folder; `split` and `part` keep one seeded share of the folder."""

    name: str
    synthetic: int | None
    images: Path | None
    seed: int
    limit: int | None
    split: tuple[float, ...] | None = None  # fractions of the folder, summing to 1
    part: int | None = None  # which of them this block is, from 1
    skip_bad: bool = False  # leave unreadable images out, with a warning, rather than stop


@dataclass(frozen=True)
class PassPlan:
    name: str
    params: dict[str, Any]
    spans: dict[str, Span] = field(compare=False)


def recovering(passes) -> tuple[int, PassPlan] | None:
    """(index, plan) of the pass that trains a budget's searched passes' model back (a finetune): the first
    pass that recovers after the last one the budget searches; None when there is none."""
    from evc.registry import PASSES

    searched = [i for i, p in enumerate(passes) if PASSES[p.name].searched(p.params)]
    for index in range(max(searched, default=-1) + 1, len(passes)):
        if PASSES[passes[index].name].recovers:
            return index, passes[index]
    return None


@dataclass(frozen=True)
class TargetPlan:
    name: str
    device: str
    format: str
    params: dict[str, Any]
    spans: dict[str, Span] = field(compare=False)


@dataclass(frozen=True)
class EvaluatePlan:
    """`evaluate { data = val, top = [1, 5] }`: accuracy before, after, and of every artifact."""

    data: str
    top: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    path: Path
    text: str
    model: ModelPlan
    data: dict[str, DataPlan]
    passes: tuple[PassPlan, ...]
    targets: tuple[TargetPlan, ...]
    evaluate: EvaluatePlan | None = None
    teachers: dict[str, ModelPlan] = field(default_factory=dict)  # model blocks after the first, by name
    budget: PassPlan | None = None  # `budget { ... }` in compress: the searched passes' keep (evc.passes.budget)

    @property
    def stem(self) -> str:
        return self.path.stem

    def error(self, span: Span | None, message: str, hint: str | None = None) -> SpecError:
        """A spec error found after checking, e.g. once the model's depth is known."""
        return SpecError.at(str(self.path), self.text, span, message, hint)
