"""Every cache key of a build, derived once, and every digest evc takes. No other module hashes.

    keys = derive(plan)
    keys.load                 # the model as loaded
    keys.passes[i]            # the program after pass i
    keys.program              # the program every target lowers
    keys.lower["x5"]          # the lowered, validated artifacts of target x5
    keys.bundle["x5"]         # the bundle of target x5: its manifest carries this key
    keys.evaluate             # the evaluation of the model as loaded and compressed

A stage's key hashes the record of what that stage reads, its input stage's
key first, so a change anywhere upstream changes every key below it. Deriving
reads files (weights, a folder's listing, templates) but never imports torch:
an unchanged spec rebuilds from its bundles' keys alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from evc.spec.params import PerLayer
from evc.spec.plan import HubWeights

# Libraries whose versions change what a stage produces.
_LIBRARIES = ("evc", "torch", "timm", "transformers", "onnx", "onnxruntime", "onnxslim", "litert-torch",
              "ai-edge-litert", "ai-edge-quantizer", "executorch", "torchao")


@dataclass(frozen=True)
class Keys:
    weights: str  # the checkpoint's sha256, or "random"
    load: str
    passes: tuple[str, ...]  # the program after each pass, in order
    lower: dict[str, str]  # per target name
    bundle: dict[str, str]  # per target name
    evaluate: str | None  # None without an evaluate block
    budget: str | None = None  # what a budget's search reads: the model as loaded, the budget, its data

    @property
    def program(self) -> str:
        """The program after every pass: what the targets lower."""
        return self.passes[-1] if self.passes else self.load


def derive(plan) -> Keys:
    """Every stage's key for `plan`, from one record of what each stage reads."""
    from evc.model.data import DEFAULT_VALIDATION
    from evc.registry import DEVICES, FORMATS, PASSES
    from evc.spec.params import ModelRef, data_refs

    weights = model_digest(plan.model, plan.path.parent, plan)
    # The input resolved at load follows from the spec's image(...), the source and the weights (a Hub
    # repository's tag picks its own preprocessing), so those key it, not the resolved values.
    hub = plan.model.weights if isinstance(plan.model.weights, HubWeights) else None
    from evc.errors import at_value

    with at_value(plan, plan.model.spans, "source"):
        code = source_code_digest(plan)
    load = stage_key("load", plan.model.source, plan.model.input, weights, hub, code, plan.model.output,
                     library_versions())
    passes, key, budget = [], load, None
    if plan.budget is not None:  # what the searched passes' keep follows from
        searched = [p for p in plan.passes if p.params.get("keep") is None]
        timed_on = [t for t in plan.targets if t.name == plan.budget.params.get("on")]  # a latency budget's
        judged = [[data_identity(plan.data[d]) for d in data_refs(PASSES[p.name].params, p.params)]
                  for p in plan.passes]  # a candidate trained by recovery reads the finetune's images
        from evc.spec.blocks import BUDGET_PARAMS

        read = [data_identity(plan.data[d]) for d in data_refs(BUDGET_PARAMS, plan.budget.params)]
        evaluated = plan.evaluate and data_identity(plan.data[plan.evaluate.data])  # judged on, without judge_data
        budget = key = stage_key("budget", key, plan.budget, read, searched, timed_on, judged, evaluated)
    for p in plan.passes:
        declared = PASSES[p.name].params
        data = {name: data_identity(plan.data[name]) for name in data_refs(declared, p.params)}
        teachers = {name: (plan.teachers[name], model_digest(plan.teachers[name], plan.path.parent, plan))
                    for name in data_refs(declared, p.params, ModelRef) if name in plan.teachers}
        key = stage_key("pass", key, p, data, teachers)
        passes.append(key)
    program = key
    evaluate = plan.evaluate and [data_identity(plan.data[plan.evaluate.data]), plan.evaluate.top]
    lower, bundle = {}, {}
    for target in plan.targets:
        fmt, device = FORMATS[target.format], DEVICES[target.device]
        params = {p.name: target.params[p.name] for p in fmt.params}
        validate = plan.data[target.params["validate"]] if target.params.get("validate") else DEFAULT_VALIDATION
        data = [validate] + [plan.data[name] for name in data_refs(fmt.params, params)]
        lower[target.name] = stage_key("lower", program, target.format, params, [data_identity(d) for d in data],
                                       device.facts, evaluate)
        bundle[target.name] = stage_key("target", lower[target.name], target, templates_digest(device),
                                        plan.path.name)
    evaluation = evaluate and stage_key("evaluate", program, load, evaluate, library_versions())
    return Keys(weights, load, tuple(passes), lower, bundle, evaluation, budget)


def stage_key(*parts: Any) -> str:
    text = json.dumps(canonical(list(parts)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def canonical(value: Any) -> Any:
    """A JSON-able form that ignores source spans, so a moved comment does not invalidate."""
    if isinstance(value, PerLayer):
        return list(value.values)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name not in ("span", "spans")}
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in value.items()}  # stage_key sorts when it hashes
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def library_versions() -> dict[str, str]:
    from importlib import metadata  # 20-50 ms of imports: not on `evc check`'s path

    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


# ---- digests of what the stages read ------------------------------------------------------------

def file_digest(path: Path) -> str:
    """A file's sha256, read in chunks: checkpoints and artifacts are hundreds of MB."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_digest(folder: Path) -> str:
    """The sha256 of a folder's files (not its subfolders): each one's name and sha256, by name."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return text_digest(json.dumps([(p.name, file_digest(p)) for p in files]))


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def model_digest(model, spec_dir: Path, plan=None) -> str:
    """A model block's checkpoint sha256 (a Hub checkpoint's as cached; an hf folder's or cached repository
    snapshot's files), or "random" when it has none. With the `plan`, a checkpoint or folder that cannot be
    found is a spec error at the value naming it."""
    from evc.errors import at_value
    from evc.model.hub import checkpoint_file

    if model.weights:
        with at_value(plan, model.spans, "weights"):
            return file_digest(checkpoint_file(model.weights))
    if model.source.kind == "hf":
        with at_value(plan, model.spans, "source"):
            return _hf_digest(model.source, spec_dir)
    return "random"


def source_code_digest(plan) -> str | None:
    """For `python("pkg.module:factory")`, the module file's sha256, found without importing it;
    for `hf("folder")` or `hf("org/name")`, the folder's or cached snapshot's files (config.json, the
    weights), by name and sha256."""
    if plan.model.source.kind == "hf":
        return _hf_digest(plan.model.source, plan.path.parent)
    if plan.model.source.kind != "python":
        return None
    module = plan.model.source.name.split(":")[0].replace(".", "/")
    for base in (plan.path.parent, *map(Path, filter(None, sys.path))):
        for candidate in (base / f"{module}.py", base / module / "__init__.py"):
            if candidate.is_file():
                return file_digest(candidate)
    return None


def _hf_digest(source, spec_dir: Path) -> str:
    from evc.model.hf import hf_files

    return folder_digest(hf_files(source.name, dict(source.kwargs), spec_dir))


def data_identity(data) -> dict:
    """What a data block's images are: its settings (split, part and skip_bad among them) and, for a folder,
    its files' names, sizes and modification times."""
    identity = canonical(data)
    if data.images is not None:
        identity["files"] = [(str(p.relative_to(data.images)), p.stat().st_size, p.stat().st_mtime_ns)
                             for p in sorted(data.images.rglob("*")) if p.is_file()]
    return identity


def templates_digest(device) -> str:
    """A device's script templates and the payload files its bundles carry."""
    from evc.bundle.scripts import bundle_files

    digest = hashlib.sha256()
    for path in bundle_files(device):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def checkpoint_key(run: dict, steps_per_epoch: int, models: Iterable) -> str:
    """What a training checkpoint was trained from: the run's settings, the steps an epoch takes, and each
    model's weights, names and shapes (None for a model that is absent)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([run, steps_per_epoch], sort_keys=True).encode())
    for model in models:
        for name, tensor in (model.state_dict() if model is not None else {}).items():
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(dtype=_uint8()).numpy())
        digest.update(b"|")
    return digest.hexdigest()


def _uint8():
    import torch

    return torch.uint8
