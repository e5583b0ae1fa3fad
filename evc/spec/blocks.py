"""The built-in blocks' declarations: model, data, evaluate and target, as plug-ins declare theirs.

They drive checking (`evc.spec.check`), defaults and the README's tables alike.
"""

from __future__ import annotations

import re
from typing import Any

from evc.errors import Span
from evc.spec import ast
from evc.spec.params import (
    REQUIRED,
    Amount,
    AnyOf,
    Choice,
    DataRef,
    Duration,
    Flag,
    Float,
    Int,
    Invalid,
    Kind,
    ListOf,
    Param,
    Ratio,
    TargetRef,
    Text,
    Time,
    When,
    did_you_mean,
)
from evc.spec.plan import HubWeights, ImageSpec, Source

BLOCK_KINDS = ("model", "data", "compress", "evaluate", "target")


def _literal(value: ast.Value) -> Any:
    """A plain Python value for a call's keyword argument (`num_classes = 10`)."""
    if isinstance(value, ast.List):
        return [_literal(v) for v in value.items]
    if isinstance(value, ast.Ident):  # `class_token = false` is the bool, not the word
        return {"true": True, "false": False}.get(value.name, value.name)
    if isinstance(value, ast.Call):
        raise Invalid(f"a call is not allowed here: {value.name}(...)", value.span)
    if isinstance(value, ast.Table):
        return _table_literal(value)
    if isinstance(value, ast.Percent):
        return value.value / 100
    return float(value.value) if isinstance(value, ast.Fraction) else value.value


def _table_literal(table: ast.Table) -> dict:
    """A table as a dict (timm's `pretrained_cfg_overlay = { file = "..." }`); a repeated key is an error."""
    values = {}
    for entry in table.entries:
        if entry.key in values:
            raise Invalid(f"duplicate key '{entry.key}' in the table", entry.span)
        values[entry.key] = _literal(entry.value)
    return values


class ModelSource(Kind):
    text = 'timm("model_name"), hf("path/to/folder") or python("package.module:factory")'
    _python_ref = r"[A-Za-z_][\w.]*:[A-Za-z_]\w*"
    _kinds = ("timm", "hf", "python")

    def check(self, value):
        if not isinstance(value, ast.Call) or value.name not in self._kinds:
            hint = did_you_mean(value.name, self._kinds) if isinstance(value, ast.Call) else None
            raise Invalid(f"expected {self.text}, found {value.describe()}", value.span, hint)
        if len(value.args) != 1 or not isinstance(value.args[0], ast.String):
            raise Invalid(f"{value.name}(...) takes one string: the model's name", value.span)
        name = value.args[0].value
        if value.name == "python" and not re.fullmatch(self._python_ref, name):
            raise Invalid(f'"{name}" is not of the form "package.module:factory"', value.args[0].span)
        kwargs = tuple((k.name, _literal(k.value)) for k in value.kwargs)
        return Source(value.name, name, kwargs)


def _call_keywords(call: ast.Call, params: tuple[Param, ...]) -> dict:
    """A call's keyword arguments, each checked by its declared Param; those not given are left out."""
    declared = {p.name: p for p in params}
    values = {}
    for kw in call.kwargs:
        param = declared.get(kw.name)
        if param is None or kw.name in values:
            what = "unknown" if param is None else "duplicate"
            raise Invalid(f"{what} argument '{kw.name}' of {call.name}(...)", kw.span,
                          did_you_mean(kw.name, declared) if param is None else None)
        values[kw.name] = param.check(kw.value)
    return values


IMAGE_ARGUMENTS = (
    Param("height", Int(1, 8192), None, "first positional argument, in pixels"),
    Param("width", Int(1, 8192), None, "second positional argument, in pixels; give both sizes or neither"),
    Param("mean", ListOf(Float(0, 1), length=3), None, "per-channel mean subtracted from pixels / 255"),
    Param("std", ListOf(Float(0, 1e3, open_low=True), length=3), None, "per-channel std the result is divided by"),
    Param("crop_pct", Float(0, 1, open_low=True), None,
          "share of the resized image the centre crop keeps: images are resized to size / crop_pct first"),
    Param("interpolation", Choice(("bilinear", "bicubic", "nearest")), None, "how images are resized"),
)


class ImageInputKind(Kind):
    """`image(224, 224, mean = [...])`, or `image()`: what it leaves out comes from the model's data config."""

    text = "image(height, width, mean = [r, g, b], ...), each argument optional"
    call, arguments = "image", IMAGE_ARGUMENTS
    about = ("the input image; an argument left out takes the model's own value, from timm's pretrained_cfg "
             "or preprocessor_config.json, and the manifest records where each came from")
    omitted = "the model's"  # what an argument left out gets: see evc.model.preprocess

    def check(self, value):
        if not isinstance(value, ast.Call) or value.name != "image":
            raise Invalid(f"expected {self.text}, found {value.describe()}", value.span)
        if len(value.args) not in (0, 2):
            raise Invalid("image(...) takes two sizes, height and width, or none for the model's own",
                          value.span)
        sizes = dict(zip(("height", "width"), (p.check(v) for p, v in zip(IMAGE_ARGUMENTS, value.args))))
        return ImageSpec(**sizes, **_call_keywords(value, IMAGE_ARGUMENTS[2:]))


HUB_ARGUMENTS = (
    Param("repo", Text(r"[\w.-]+(/[\w.-]+)?", "a repository id"), help='the positional argument, e.g. '
          '"timm/deit_tiny_patch16_224.fb_in1k"'),
    Param("revision", Text(), "main", "a branch, tag or commit; the manifest records the commit it resolved to"),
    Param("file", Text(), None, "the checkpoint in the repository (default: model.safetensors, else "
          "pytorch_model.bin)"),
)


class WeightsKind(Kind):
    """`weights = "ckpt.safetensors"` or `weights = hub("timm/deit_tiny_patch16_224.fb_in1k")`."""

    text = 'a path to a .safetensors or .pth file, or hub("org/name")'
    call, arguments = "hub", HUB_ARGUMENTS
    about = ("a checkpoint in a Hugging Face Hub repository, downloaded into huggingface_hub's cache and "
             "read from there offline (HF_HUB_OFFLINE=1)")

    def check(self, value):
        if isinstance(value, ast.String):
            return value.value
        if not isinstance(value, ast.Call) or value.name != "hub":
            hint = did_you_mean(value.name, ("hub",)) if isinstance(value, ast.Call) else None
            raise Invalid(f"expected {self.text}, found {value.describe()}", value.span, hint)
        if len(value.args) != 1:
            raise Invalid('hub(...) takes one string: the repository, as in hub("timm/deit_tiny_patch16_224")',
                          value.span)
        return HubWeights(HUB_ARGUMENTS[0].check(value.args[0]), **_call_keywords(value, HUB_ARGUMENTS[1:]))


MODEL_PARAMS = (
    Param("source", ModelSource(), help="where the model comes from"),
    Param("input", ImageInputKind(), help="the input image: size and normalisation (`image(...)` below)"),
    Param("weights", WeightsKind(), None,
          "checkpoint to load (`hub(...)` below); without it the model is randomly initialised"),
    Param("output", Text(shape='the name of one of the model\'s outputs, e.g. "logits"'), None,
          "which output to compress when the model returns several (a dict or a ModelOutput); "
          "without it: logits, else pooler_output, else last_hidden_state[:, 0]"),
)

DATA_PARAMS = (
    Param("synthetic", Int(1), None, "this many random images, drawn from a seeded generator"),
    Param("images", Text(shape="a path to a folder of images"), None,
          "a folder of images: one subfolder per class gives labels; images directly in it have none"),
    Param("seed", Int(0), 0, "seed for synthetic images and for split"),
    Param("split", ListOf(Float(0, 1, open_low=True)), None,
          "divide the folder into seeded shares that sum to 1, each class alike, e.g. [0.9, 0.1]",
          needed_when=(When("part"),), only_with="images"),
    Param("part", Int(1), None, "which share of `split` this block is, counting from 1",
          needed_when=(When("split"),), only_with="images"),
    Param("limit", Int(1), None, "use at most this many images of the folder (of its share, with split)"),
    Param("skip_bad", Flag(), False, "leave out unreadable images with a warning, rather than stop",
          only_with="images"),
)


def data_problem(values: dict, spans: dict[str, Span]) -> tuple[str, Span] | None:
    """What is wrong, and where, with a data block's split: values the declared rules cannot see."""
    split, part = values["split"], values["part"]
    if split is not None and abs(sum(split) - 1) > 1e-6:
        return f"split: the shares sum to {sum(split):g}, not 1", spans["split"]
    if part is not None and part > len(split):
        return f"part: {part} is out of range: split has {len(split)} shares", spans["part"]
    return None


EVALUATE_PARAMS = (
    Param("data", DataRef(), help="labelled images (class subfolders) to measure accuracy on"),
    Param("top", ListOf(Int(1), or_single=True), (1, 5), "the top-k accuracies to report"),
)


class RegisteredName(Kind):
    """A device or format name; checked against its registry by the checker itself."""

    def __init__(self, what: str):
        self.text = f"the name of a {what} (below)"


TARGET_PARAMS = (
    Param("device", RegisteredName("device"), help="the device the bundle is for"),
    Param("format", RegisteredName("format"), help="the artifact format lowered to"),
    Param("validate", DataRef(), None, "data for the parity check (default: 8 synthetic images)"),
)


BUDGET = "budget"  # a compress block's `budget { ... }`: not a pass, the search that chooses their keys
METRICS = ("macs", "params", "latency")
BUDGET_PARAMS = (
    Param("macs", Amount(), None, "the compressed model's multiply-accumulates: a share of the model's own "
                                  "(50%) or a count (600M)", not_with=("params", "latency")),
    Param("params", Amount(), None, "the compressed model's parameters: a share (60%) or a count (8M)",
          not_with=("macs", "latency")),
    Param("latency", Time(), None, "the compressed model's time on the target `on`, as its latency table "
                                   "(evc profile) predicts it: a time (12ms) or a share (50%)",
          not_with=("macs", "params")),
    Param("on", TargetRef(), None, "the target whose latency table a latency budget reads (evc profile)",
          only_with="latency"),
    Param("data", DataRef(), REQUIRED, "images each block's sensitivity is measured on"),
    Param("samples", Int(1), 32, "how many of those images"),
    Param("judge", Choice(("auto", "recovery", "divergence")), "auto",
          "how allocations are compared: recovery, each candidate (uniform ratios always among them) trained "
          "briefly by the finetune that follows and scored on images it held back; divergence, the one-shot "
          "sensitivity alone; auto: recovery when a finetune follows the searched passes"),
    Param("steps", AnyOf((Int(1), Choice(("auto",)))), "auto",
          "training steps each candidate gets, of the finetune's own recipe; auto: a quarter of the finetune's"),
    Param("refine", AnyOf((Int(1), Choice(("auto", "none")))), "none",
          "a second round: the best candidate alike in every block and its neighbours (one block's heads one "
          "fewer or one more, the MLPs at one share again), each trained this many steps; auto: 4 × steps"),
    Param("judge_data", DataRef(), None, "labelled images the model as loaded never trained on, to judge "
                                        "candidates on; default: the evaluate block's, else `holdout`"),
    Param("holdout", Ratio(0, 0.5), 0.2, "without judge_data or an evaluate block: the share of the finetune's "
                                         "images held back to judge candidates on"),
    Param("time", Duration(), None, "a limit on judging: candidates not started by then are left out (uniform "
                                    "and the sensitivity allocation are always judged)"),
    Param("workers", AnyOf((Int(1), Choice(("auto",)))), "auto",
          "processes judging candidates at once; auto: one per 2 cores on a CPU, one on a GPU"),
)


def check_budget(values: dict, spans: dict, at) -> None:
    """A budget names one of its metrics; a latency, the target it is timed on."""
    given = [m for m in METRICS if values.get(m) is not None]
    if not given:
        raise Invalid("a budget needs `macs`, `params` or `latency`, e.g. `budget { macs = 50%, data = calib }`", at)
    if values.get("latency") is not None and values.get("on") is None:
        raise Invalid("a latency budget needs `on`, the target it is timed on: `latency = 12ms, on = cpu`",
                      spans.get("latency", at))
