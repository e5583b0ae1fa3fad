"""decompose on deit_tiny: each part against the whole model, and the parts served in parallel over gRPC on loopback.

    .venv/bin/python benchmarks/decompose.py [--parts 2 4] [--runs 100]

timm's deit_tiny_patch16_224 (random init, 224×224, 1000 classes, depth 12)
is captured as a Program and, for each N, decomposed by evc's own decompose
pass, called directly: `decompose { parts = N, keep = 1/N, score = l1,
drop = true, epochs = 0 }`, its `data` 64 random images labelled by the
model's own top-1. The bundle is written as evc's onnx format lowers a
decomposed Program (`evc.targets.lower._lower_parts`): each part with export_onnx,
the fusion with export_module, collab.json with evc.runtime.collab.contract.write;
the whole model with export_onnx. Each part's ONNX is checked against its
Program, and the served answer against the parts and fusion run here (equal,
before timing) and against the PyTorch ensemble.

Timed taking turns run by run (`_timing.interleaved`), one image per call, at
1 ONNX Runtime thread each, with benchmarks/collab.py's rows (`collab.timed`):

    whole               the original model in ONNX Runtime, in this process
    part k alone        part k in ONNX Runtime, in this process
    fusion alone        evc.runtime.collab.runtime.Fusion on the parts' features
    parts at once       all N parts in this process, each in its own thread:
                        the served parts' competition for the cores, without gRPC
    over gRPC           Coordinator.infer, each part served by `evc serve
                        --threads 1` in its own process on 127.0.0.1
    one call            part 0 alone over gRPC (the per-call cost, no other part
                        competing)
    transfer            each part's request and reply bytes through a plain
                        loopback TCP socket and back, the parts at once; and
                        part 0's alone
    ..., pixels         the same with the image sent as uint8 pixels (what
                        `evc infer` sends for a picture file), normalised by
                        the part: a quarter of the bytes

The goal (issue 13): overhead = over gRPC − slowest part − fusion at most
1 ms plus the transfer. With fewer free cores than parts the parts queue for
the cores, which is no cost of serving; `over gRPC − parts at once − fusion`
leaves that queueing out.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from collab import machine, met, timed  # the gRPC benchmark's rows, served the same way; its machine line
from tokens import macs

from evc.ir.program import Program
from evc.passes.decompose import Decompose
from evc.registry import PASSES
from evc.runtime.collab import contract
from evc.runtime.collab.runtime import PRESENT, TOKENS
from evc.spec.plan import ImageInput
from evc.targets.lower import FUSION
from evc.targets.onnx import export_module, export_onnx, session

MODEL, SIZE, THREADS, SAMPLES, OPSET = "deit_tiny_patch16_224", 224, 1, 64, 17


class _Labelled:
    """What decompose asks of the driver: its data block, labelled by the model's own top-1."""

    def __init__(self, program: Program, images: np.ndarray):
        self._images, self.labels = images, program.run(images).argmax(-1).numpy()

    def labelled(self, name):
        return self._images, self.labels

    def report(self, key, value):
        pass

    def error(self, key, message):
        return ValueError(f"decompose: {key}: {message}")


def decomposed(original: Program, parts: int, images: np.ndarray) -> Program:
    defaults = {p.name: p.default for p in PASSES["decompose"].params if not p.required}
    params = defaults | dict(parts=parts, keep=1 / parts, score="l1", data="train", drop=True, epochs=0)
    return Decompose().run(original, params, _Labelled(original, images))


def write_bundle(folder: Path, program: Program) -> Path:
    """The decomposed Program's parts, fusion and collab.json, as `evc.targets.lower._lower_parts` writes them."""
    served = []
    for part in program.parts:
        (folder / part.name).mkdir(parents=True)
        export_onnx(part.program, folder / part.name / "model.onnx", OPSET)
        served.append((f"{part.name}/model.onnx", part.width))
    width = sum(p.width for p in program.parts)
    export_module(program.fusion, (torch.zeros(1, width), torch.zeros(1, len(program.parts))), folder / FUSION,
                  inputs=(TOKENS, PRESENT))
    contract.write(folder, program.input, served, FUSION, bool(program.fusion.drop))
    return folder


def measure(original: Program, whole, parts: int, runs: int, images: np.ndarray, feed: np.ndarray,
            work: Path) -> dict:
    start = time.perf_counter()
    program = decomposed(original, parts, images)
    bundle = write_bundle(work / f"n{parts}", program)
    print(f"N = {parts}: decomposed and exported in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    result = timed(bundle, feed, runs, work, {"whole": whole})
    diff = max(float(np.abs(f - p.program.run(feed).numpy()).max()) for f, p in zip(result["features"], program.parts))
    ensemble = float(np.abs(result["logits"] - program.run(feed).numpy()).max())
    print(f"N = {parts}: max abs diff of the parts' ONNX from their Programs {diff:.1e}, of the served answer "
          f"from the PyTorch ensemble {ensemble:.1e}", file=sys.stderr)
    return {**result, "program": program, "macs": [macs(p.program) for p in program.parts],
            "fusion macs": program.fusion.linear.weight.numel()}


def shape(program: Program) -> str:
    """Heads and MLP hidden width, block by block where they differ."""
    blocks = {(b.attn.num_heads, b.mlp.hidden) for b in program.structure.blocks}
    return " ; ".join(f"{heads} / {hidden}" for heads, hidden in sorted(blocks))


def parts_table(original: Program, rows: list) -> None:
    print("| N | model | heads / MLP hidden | MACs (M) | ms alone | × whole's ms | × whole's MACs "
          "| bytes per image: request / reply |")
    print("|---|---|---|---|---|---|---|---|")
    whole_macs = macs(original)
    for parts, r in rows:
        t, whole = r["times"], r["times"]["whole"]
        print(f"| {parts} | whole | {shape(original)} | {whole_macs / 1e6:,.0f} | {whole:.2f} | 1 | 1 | |")
        for k, part in enumerate(r["program"].parts):
            print(f"| {parts} | part {k} ({len(part.classes)} classes) | {shape(part.program)} "
                  f"| {r['macs'][k] / 1e6:,.0f} | {t[f'part {k} alone']:.2f} | {t[f'part {k} alone'] / whole:.2f} "
                  f"| {r['macs'][k] / whole_macs:.2f} | {r['request']:,} / {r['replies'][k]:,} |")
        print(f"| {parts} | fusion | {sum(p.width for p in r['program'].parts) + parts} → "
              f"{original.structure.num_classes} | {r['fusion macs'] / 1e6:.2f} | {t['fusion alone']:.2f} "
              f"| {t['fusion alone'] / whole:.2f} | | |")
        total = sum(r["macs"]) + r["fusion macs"]
        run = sum(t[f"part {k} alone"] for k in range(parts)) + t["fusion alone"]
        print(f"| {parts} | parts + fusion, summed | | {total / 1e6:,.0f} | {run:.2f} | {run / whole:.2f} "
              f"| {total / whole_macs:.2f} | {parts * r['request']:,} / {sum(r['replies']):,} |")


def serving_table(rows: list) -> None:
    print("| N | slowest part alone | fusion | parts at once, in-process | image sent as | over gRPC, end to end "
          "| overhead: over gRPC − slowest − fusion (goal ≤ 1 + transfer) | over gRPC − parts at once − fusion "
          "| over gRPC − slowest served compute − fusion (goal ≤ 1 + transfer) "
          "| one call − part 0 alone (transfer, one part) "
          "| request bytes per part |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for parts, r in rows:
        t = r["times"]
        slowest = max(t[f"part {k} alone"] for k in range(parts))
        for sent, suffix, size in (("float32", "", r["request"]), ("uint8 pixels", ", pixels", r["pixel request"])):
            goal = 1 + t["transfer" + suffix]
            print(f"| {parts} | {slowest:.2f} | {t['fusion alone']:.2f} | {t['parts at once']:.2f} | {sent} "
                  f"| {t['over gRPC' + suffix]:.2f} "
                  f"| {met(t['over gRPC' + suffix] - slowest - t['fusion alone'], goal)} "
                  f"| {t['over gRPC' + suffix] - t['parts at once'] - t['fusion alone']:.2f} "
                  f"| {met(t['over gRPC − served compute' + suffix] - t['fusion alone'], goal)} "
                  f"| {t['one call' + suffix] - t['part 0 alone']:.2f} ({t['transfer, one part' + suffix]:.2f}) "
                  f"| {size:,} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    print(machine())
    print(f"model: {MODEL}, random init, {SIZE}×{SIZE}, 1000 classes, depth 12; decompose keep = 1/N, score = l1, "
          f"drop = true, epochs = 0, on {SAMPLES} random images labelled by its top-1; {THREADS} thread each; "
          f"median of {args.runs} runs after 10 warm-ups, one image per call\n")
    torch.manual_seed(0)
    original = Program.from_module(timm.create_model(MODEL).eval(), ImageInput(SIZE, SIZE))
    rng = np.random.default_rng(0)
    images = rng.standard_normal((SAMPLES, 3, SIZE, SIZE), dtype=np.float32)
    feed = rng.standard_normal((1, 3, SIZE, SIZE), dtype=np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        export_onnx(original, work / "whole.onnx", OPSET)
        whole = session(work / "whole.onnx", THREADS)
        for parts in args.parts:
            start = time.perf_counter()
            rows.append((parts, measure(original, whole, parts, args.runs, images, feed, work)))
            print(f"N = {parts}: measured in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    parts_table(original, rows)
    print()
    serving_table(rows)
    print("\nms, median of the interleaved runs; bytes as gRPC messages (tensor and framing)")


if __name__ == "__main__":
    main()
