"""evc's structural pruning against Torch-Pruning on deit_small, heads and FFN at keep 0.5.

    .venv/bin/pip install -r benchmarks/requirements.txt    # Torch-Pruning, benchmark only
    .venv/bin/python benchmarks/structural.py [--runs 50]

Both tools remove the same heads and hidden units (the ones evc's l1 scores
choose): evc through its passes, Torch-Pruning through its DependencyGraph.
Every model is exported with torch.onnx and simplified with onnxslim the same
way, then timed in ONNX Runtime at 1 thread and at all threads, the models
taking turns run by run so that the machine's noise falls on all alike.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import interleaved  # noqa: E402

from evc.ir import node_macs, trace  # noqa: E402
from evc.ir.program import Program  # noqa: E402
from evc.passes._importance import head_norms, hidden_norms, top  # noqa: E402
from evc.passes.ffn_prune import FfnPrune, width  # noqa: E402
from evc.passes.head_prune import HeadPrune  # noqa: E402
from evc.spec.plan import ImageInput  # noqa: E402
from evc.targets.onnx import export_onnx  # noqa: E402

ffn_prune = FfnPrune().run
head_prune = HeadPrune().run

MODEL, KEEP, SHAPE = "deit_small_patch16_224", 0.5, (1, 3, 224, 224)


class _Ctx:
    def __init__(self, params):
        self.params = params

    def per_layer(self, key, depth):
        return (self.params[key],) * depth


def evc_prune(program: Program) -> tuple[Program, float]:
    heads = {"keep": KEEP, "score": "l1", "scope": "layer", "min_heads": 1, "data": None}
    ffn = {"keep": KEEP, "score": "l1", "round_to": 8, "data": None}
    start = time.perf_counter()
    pruned = ffn_prune(head_prune(program, heads, _Ctx(heads)), ffn, _Ctx(ffn))
    return pruned, time.perf_counter() - start


def removed_units(program: Program) -> tuple[dict, dict]:
    """The heads and hidden units evc's l1 scores remove, for Torch-Pruning to remove too."""
    heads, hidden = {}, {}
    for block in program.structure.blocks:
        attn, mlp = block.attn, block.mlp
        kept = top(head_norms(program.graph, attn, 1, ""), round(KEEP * attn.num_heads))
        heads[block.index] = sorted(set(range(attn.num_heads)) - set(kept))
        kept = top(hidden_norms(program.graph, mlp, 1), width(KEEP, mlp.hidden, 8))
        hidden[block.index] = sorted(set(range(mlp.hidden)) - set(kept))
    return heads, hidden


def macs(module) -> int:
    return sum(node_macs(trace(copy.deepcopy(module), torch.zeros(SHAPE)), torch.zeros(SHAPE)).values())


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def export_module(module, path: Path) -> tuple[bool, str]:
    """torch.onnx + onnxslim, as evc exports, for a model that is not a Program."""
    import onnx
    import onnxslim

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (torch.zeros(SHAPE),), str(path), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"])
        onnx.save(onnxslim.slim(str(path)), str(path))
        return True, "ok"
    except Exception as e:  # the point is to report whether it exports
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


def latencies(paths: dict[str, Path], threads: int, runs: int, warmups: int = 10) -> dict[str, float]:
    """Median ms per model in ONNX Runtime, the models taking turns run by run."""
    feed = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    sessions = {}
    for name, path in paths.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        sessions[name] = lambda x, session=session: session.run(None, {"input": x})
    return interleaved(sessions, feed, runs, warmups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    from torch_pruning_baseline import prune_with_torch_pruning

    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False).eval()
    program = Program.from_module(copy.deepcopy(model), ImageInput(224, 224))
    pruned, evc_seconds = evc_prune(program)
    heads, hidden = removed_units(program)
    tp = prune_with_torch_pruning(copy.deepcopy(model), heads, hidden)

    x = torch.randn(2, *SHAPE[1:])
    with torch.inference_mode():
        agree = float((pruned.graph(x) - tp.model(x)).abs().max())

    work = Path(tempfile.mkdtemp())
    paths = {"unpruned": work / "unpruned.onnx", "evc": work / "evc.onnx", "torch-pruning": work / "tp.onnx"}
    export_onnx(program, paths["unpruned"], 17)
    export_onnx(pruned, paths["evc"], 17)
    tp_export = export_module(tp.model, paths["torch-pruning"])
    if not tp_export[0]:
        del paths["torch-pruning"]
    cores = len(os.sched_getaffinity(0))
    timings = {t: latencies(paths, t, args.runs) for t in sorted({1, cores})}

    counts = {"unpruned": (params(model), macs(model)), "evc": (params(pruned.graph), macs(pruned.graph)),
              "torch-pruning": (tp.params, macs(tp.model))}
    ideal = counts["unpruned"][1] / counts["evc"][1]
    print(f"{MODEL}, random init, heads keep {KEEP}, FFN keep {KEEP}; ONNX Runtime {ort.__version__}, "
          f"median of {args.runs} runs after 10 warm-ups, models interleaved; {cores} cores")
    print(f"evc and Torch-Pruning removed the same units: their outputs differ by {agree:.1e} at most\n")
    print("| | unpruned | evc | Torch-Pruning |")
    print("|---|---|---|---|")
    print("| params (M) | " + " | ".join(f"{counts[k][0] / 1e6:.2f}" for k in counts) + " |")
    print("| MACs (G) | " + " | ".join(f"{counts[k][1] / 1e9:.3f}" for k in counts) + " |")
    tp_ideal = counts["unpruned"][1] / counts["torch-pruning"][1]
    print(f"| ideal speedup (MACs ratio) | 1 | {ideal:.2f} | {tp_ideal:.2f} |")
    print(f"| ONNX export | ok | ok | {tp_export[1]} |")
    for threads, medians in timings.items():
        row = [f"{medians[k]:.1f}" if k in medians else "-" for k in counts]
        print(f"| latency, {threads} thread{'s' if threads > 1 else ''} (ms) | " + " | ".join(row) + " |")
        speed = [medians["unpruned"] / medians[k] if k in medians else None for k in counts]
        print(f"| realized speedup, {threads} thread{'s' if threads > 1 else ''} | "
              + " | ".join("-" if s is None else f"{s:.2f}" for s in speed) + " |")
        print(f"| realized / ideal, {threads} thread{'s' if threads > 1 else ''} (goal ≥ 0.9) | - | "
              + " | ".join("-" if s is None else f"{s / ideal:.2f}" for s in speed[1:]) + " |")
    print(f"| pruning wall time (s) | - | {evc_seconds:.2f} | {tp.seconds:.2f} |")
    print(f"| model code patched | - | no | {'yes: ' + tp.patch_note if tp.needed_patch else 'no'} |")


if __name__ == "__main__":
    main()
