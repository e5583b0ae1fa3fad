"""`evaluate { data = val, top = [1, 5] }`: accuracy before and after compression, and of every artifact.

    accuracy(logits, labels, (1, 5))        # {"top1": 0.98, "top5": 1.0}
    evaluate_models(plan, compiled, original, cache, keys.evaluate)  # as loaded and compressed

The model as loaded and as compressed run in PyTorch for accuracy, and both
are exported to ONNX and timed in ONNX Runtime at one thread, so the table a
build prints reads before and after side by side. Artifacts are scored where
they are validated (see `evc.targets.lower`), each in its own runtime.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import numpy as np
from rich.table import Table

from evc.cache import Cache
from evc.errors import InputError
from evc.spec.plan import Plan

RESULT = "evaluation.json"
LATENCY_RUNS, LATENCY_WARMUPS = 20, 3


def accuracy(logits: np.ndarray, labels: np.ndarray, top: tuple[int, ...]) -> dict[str, float]:
    """Share of samples whose label is among the k highest logits, for each k in `top`."""
    ranked = np.argsort(-logits, axis=1)
    return {f"top{k}": float((ranked[:, :k] == labels[:, None]).any(axis=1).mean()) for k in top}


def labelled(plan: Plan, image) -> tuple[np.ndarray, np.ndarray]:
    """The evaluate block's images and labels, preprocessed for `image` (the model's ImageInput as loaded);
    unlabelled data is an error naming the block."""
    name = plan.evaluate.data
    images, labels = _read(plan.data[name], image)
    if labels is None:
        raise InputError(f"evaluate: data '{name}' has no labels: give a folder with one subfolder per class")
    return images, labels


@functools.lru_cache(maxsize=2)
def _read(data, image) -> tuple[np.ndarray, np.ndarray | None]:
    """Read once per build: the models and every target's artifacts are scored on the same images."""
    from evc.model.data import load_labelled

    return load_labelled(data, image)


def evaluate_models(plan: Plan, compiled, original, cache: Cache, key: str) -> dict:
    """Accuracy, MACs, params and ONNX Runtime latency of the model as loaded and as compressed; cached."""
    structure = original.structure
    if structure is not None and not structure.head:
        raise InputError(f"evaluate: model '{plan.model.name}' has no classifier: it outputs "
                         f"{structure.embed_dim}-wide features, and top-k accuracy needs class logits; "
                         "remove the evaluate block, or give the model a head")
    hit = cache.get("evaluate", key)
    if hit is None:
        with cache.entry("evaluate", key) as folder:
            (folder / RESULT).write_text(json.dumps(_measure(plan, compiled, original)))
        hit = cache.path("evaluate", key)
    return json.loads((hit / RESULT).read_text())


def _measure(plan: Plan, compiled, original) -> dict:
    images, labels = labelled(plan, original.input)
    rows = {}
    for name, program, summary in (("original", original, compiled.before), ("compressed", compiled.program,
                                                                            compiled.after)):
        rows[name] = {**accuracy(program.run(images).numpy(), labels, plan.evaluate.top),
                      "macs": summary["total"]["macs"], "params": summary["total"]["params"],
                      "latency_ms": _onnx_latency(program)}
    return {"data": plan.evaluate.data, "samples": len(labels), "top": list(plan.evaluate.top), **rows}


def _onnx_latency(program) -> float:
    """Median ONNX Runtime latency at batch 1 and one thread: the same export every cpu target makes."""
    from evc.registry import FORMATS, Export, Runtime
    from evc.runtime.timing import measure

    onnx = FORMATS["onnx"].plugin
    assert isinstance(onnx, Export) and isinstance(onnx, Runtime), "the onnx format exports and runs here"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        onnx.export(program, path)
        run = onnx.session(path, threads=1)
        return measure(run, program.example().numpy(), LATENCY_RUNS, LATENCY_WARMUPS)["median_ms"]


def table(evaluation: dict, artifacts: list[tuple[str, dict]]) -> Table:
    """One table: the model as loaded, as compressed, and each artifact's accuracy."""
    top = evaluation["top"]
    result = Table(title=f"accuracy on data '{evaluation['data']}' ({evaluation['samples']} images)")
    for column in ("model", *(f"top-{k}" for k in top), "MACs", "params", "ONNX Runtime, 1 thread"):
        result.add_column(column, justify="left" if column == "model" else "right")
    for name in ("original", "compressed"):
        row = evaluation[name]
        result.add_row(name, *(f"{row[f'top{k}']:.2%}" for k in top), f"{row['macs'] / 1e6:.1f} M",
                       f"{row['params'] / 1e6:.2f} M", f"{row['latency_ms']:.2f} ms")
    for name, scores in artifacts:
        result.add_row(name, *(f"{scores[f'top{k}']:.2%}" for k in top), "", "", "")
    return result
