"""evc's token passes on deit_small: MACs saved against time saved, in ONNX Runtime and LiteRT.

    .venv/bin/python benchmarks/tokens.py [--runs 50]

deit_small_patch16_224 (random init) at 224×224, unpruned and after
patch_slim (a keep schedule cutting about 40% of the MACs, without and with
fuse) and token_merge (r = 8 and r = 16), each pass called directly. Every
model is lowered as evc lowers it: to ONNX (torch.onnx and onnxslim) and to
fp32 TFLite (litert-torch); each artifact's output is checked against the
PyTorch program's once. Then all of them are timed at 1 thread in ONNX
Runtime and in the LiteRT interpreter, the models taking turns run by run so
that the machine's noise falls on all alike. Converting the token-merged
models to TFLite takes a minute or more each.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch
from _passes import Ctx  # benchmarks/, the script's own folder
from _timing import interleaved

from evc.ir.macs import summarize
from evc.ir.program import Program
from evc.passes.patch_slim import PatchSlim
from evc.passes.token_merge import TokenMerge
from evc.spec.plan import ImageInput
from evc.targets.onnx import Onnx, export_onnx, op_counts
from evc.targets.tflite import Tflite, convert, describe_ops

patch_slim = PatchSlim().run
token_merge = TokenMerge().run

MODEL, SIZE, THREADS, TOLERANCE = "deit_small_patch16_224", 224, 1, 1e-3
# EViT's layout (shares kept before blocks 3, 6 and 9), at the share that cuts about 40% of deit_small's MACs.
SHARE = 0.67
KEEP = [1, 1, 1, SHARE, 1, 1, SHARE, 1, 1, SHARE, 1, 1]


def run_pass(compress, program: Program, **params) -> Program:
    return compress(program, params, Ctx(params))


def programs(unpruned: Program) -> dict[str, Program]:
    slim = {"keep": KEEP, "score": "cls_attention", "search": None}
    return {
        "unpruned": unpruned,
        "patch_slim": run_pass(patch_slim, unpruned, **slim, fuse=False),
        "patch_slim, fuse": run_pass(patch_slim, unpruned, **slim, fuse=True),
        "token_merge r=8": run_pass(token_merge, unpruned, r=8, proportional=True),
        "token_merge r=16": run_pass(token_merge, unpruned, r=16, proportional=True),
    }


def macs(program: Program) -> int:
    return summarize(program.graph, program.structure, program.example()).macs


def lower(name: str, program: Program, work: Path) -> dict[str, Path]:
    """The program's ONNX and TFLite artifacts, as evc's targets write them."""
    stem = name.replace(" ", "_").replace(",", "").replace("=", "")
    onnx_path, tflite_path = work / f"{stem}.onnx", work / f"{stem}.tflite"
    export_onnx(program, onnx_path, 17)
    start = time.perf_counter()
    tflite_path.write_bytes(convert(program))
    print(f"{name}: converted to TFLite in {time.perf_counter() - start:.0f} s")
    return {"ort": onnx_path, "litert": tflite_path}


def ops(paths: dict[str, Path]) -> str:
    """How many ops the ONNX graph and the TFLite graph have: the token ops show up here."""
    tflite = sum(op["count"] for op in describe_ops(paths["litert"])["ops"].values())
    return f"{sum(op_counts(paths['ort']).values())} / {tflite}"


def sessions(artifacts: dict[str, dict[str, Path]]) -> dict[tuple[str, str], callable]:
    """run(x) at THREADS threads for each (model, runtime), through the targets' own sessions."""
    backends = {"ort": Onnx(), "litert": Tflite()}
    return {(name, runtime): backends[runtime].session(path, THREADS)
            for name, paths in artifacts.items() for runtime, path in paths.items()}


def check(models: dict[str, Program], runs: dict, feed: np.ndarray) -> dict[tuple[str, str], float]:
    """Max abs diff of each artifact's logits from its PyTorch program's, on one random image."""
    diffs = {}
    for (name, runtime), run in runs.items():
        with torch.inference_mode():
            reference = models[name].graph(torch.from_numpy(feed)).numpy()
        diffs[name, runtime] = float(np.abs(run(feed) - reference).max())
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()

    torch.manual_seed(0)
    unpruned = Program.from_module(timm.create_model(MODEL, pretrained=False).eval(), ImageInput(SIZE, SIZE))
    models = programs(unpruned)
    counts = {name: macs(program) for name, program in models.items()}
    work = Path(tempfile.mkdtemp())
    artifacts = {name: lower(name, program, work) for name, program in models.items()}
    runs = sessions(artifacts)

    feed = np.random.default_rng(0).standard_normal(unpruned.input.shape, dtype=np.float32)
    diffs = check(models, runs, feed)
    print(f"\nparity, max abs diff from PyTorch on one random image (must be < {TOLERANCE:g}):")
    for (name, runtime), diff in diffs.items():
        print(f"  {name}, {runtime}: {diff:.1e} {'ok' if diff < TOLERANCE else 'FAILED'}")
    medians = interleaved(runs, feed, args.runs)

    import ai_edge_litert

    print(f"\n{MODEL}, random init, {SIZE}×{SIZE}; ONNX Runtime {ort.__version__}, LiteRT "
          f"{ai_edge_litert.__version__}, {THREADS} thread; median of {args.runs} runs after 10 warm-ups, "
          f"models and runtimes interleaved")
    print(f"patch_slim keep = {KEEP} (score cls_attention); tokens entering each block:")
    for name, program in models.items():
        print(f"  {name}: {[block.tokens for block in program.structure.blocks]}")
    print("\n| | MACs (G) | ops, ONNX / TFLite | ideal speedup | ORT (ms) | ORT realized | ORT realized / ideal "
          "| LiteRT (ms) | LiteRT realized | LiteRT realized / ideal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = counts["unpruned"]
    for name in models:
        ideal = base / counts[name]
        cells = [f"{counts[name] / 1e9:.3f}", ops(artifacts[name]), f"{ideal:.2f}"]
        for runtime in ("ort", "litert"):
            realized = medians["unpruned", runtime] / medians[name, runtime]
            cells += [f"{medians[name, runtime]:.1f}", f"{realized:.2f}", f"{realized / ideal:.2f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
