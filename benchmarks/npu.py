"""Structural and token compression on Arm Ethos-U NPUs (Vela's estimate) beside ExecuTorch's XNNPACK here.

    .venv/bin/python benchmarks/npu.py [--runs 20] [--models deit_small efficientformer_l1]   # 5 to 8 min on 2 cores

For deit_small_patch16_224 and efficientformer_l1 (random weights: latency and
placement do not depend on them) at 224×224, three variants, each a spec's
compress block run through evc's pass plug-ins as a build runs them:

    base            no pass
    heads+ffn 0.5   head_prune { keep = 0.5 } and ffn_prune { keep = 0.5 }
    patch_slim      EViT's layout: 0.67 of the patches kept before a quarter, a half and three quarters
                    of the depth (about 40% of deit_small's MACs), ranked by the class token's attention
                    (by the attention they receive where the model has no class token)

MACs are counted by evc (evc.ir.macs). Each model is lowered as format = vela
lowers it for each NPU (rewritten for the NPU, converted, quantized to full
integer on 4 random images; once for the U55 and U65, whose rewrites are the
same) and compiled by Vela for the U55-128, U65-256 and U85-256 in Vela's
default system for each; its estimate (cycles at the system's clock)
and the operators it leaves to the CPU are read back. The same Program is
exported as format = pte exports it (fp32, XNNPACK) and timed here at 1
thread, the variants of one model taking turns run by run (each round
starting one later), so the machine's noise falls on all alike.

    ideal    = MACs(base) / MACs(variant)
    realized = latency(base) / latency(variant), per NPU and for ExecuTorch

and the table gives realized / ideal. A pass evc refuses for the model is
printed in its row with evc's reason. Vela's estimate is the NPU's work
alone: an operator it leaves to the CPU costs nothing in it, so the CPU
column says how far to trust a row. A second table sums Vela's cycles by
operator type (its per-layer report), which says where each NPU's time goes.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from _timing import interleaved  # benchmarks/, the script's own folder

from evc.cache import Cache
from evc.context import PassContext
from evc.driver import Stages
from evc.errors import EvcError
from evc.ir.macs import summarize
from evc.progress import Progress
from evc.registry import PASSES
from evc.spec.check import parse_and_check
from evc.targets._ethos_native import POOL_AS_DEPTHWISE
from evc.targets.pte import Pte
from evc.targets.vela import compiled, estimate

MODELS = {"deit_small": "deit_small_patch16_224", "efficientformer_l1": "efficientformer_l1"}
NPUS = ("u55_128", "u65_256", "u85_256")
SPEC = """evc 1
model {name} {{
    source = timm("{timm}")
    input  = image(224, 224)
}}
compress {{
{passes}
}}
target cpu {{ device = cpu, format = onnx }}
"""


def variants(structure) -> dict[str, str]:
    """Each variant's compress block; patch_slim's schedule is EViT's, placed by the model's depth, ranked by
    the class token's attention, or by the attention patches receive in a model without one."""
    depth = structure.depth
    keep = [0.67 if i in (depth // 4, depth // 2, 3 * depth // 4) else 1 for i in range(depth)]
    score = "cls_attention" if structure.prefix_tokens else "mean_attention"
    return {"base": "",
            "heads+ffn 0.5": "    head_prune { keep = 0.5 }\n    ffn_prune  { keep = 0.5 }",
            "patch_slim": f"    patch_slim {{ keep = {keep}, score = {score} }}"}


def planned(work: Path, name: str, passes: str):
    text = SPEC.format(name=name, timm=MODELS[name], passes=passes)
    path = work / f"{name}.evc"
    path.write_text(text)
    return parse_and_check(text, path)


def compressed(plan, original):
    """The plan's passes run on the model as loaded, as a build runs them."""
    program = original
    for p in plan.passes:
        program = PASSES[p.name].plugin.run(program, p.params, PassContext(plan, p, original, "", None, Progress()))
    return program


def macs(program) -> int:
    return summarize(program.graph, program.structure, program.example()).total.macs


def on_npus(program, folder: Path) -> dict[str, dict]:
    """Vela's estimate and placement on each NPU, of the program lowered as format = vela lowers it for that NPU
    (once for the NPUs whose lowering is the same), with its cycles by operator type from Vela's per-layer report."""
    images = np.random.default_rng(0).standard_normal((4, *program.input.shape[1:]), dtype=np.float32)
    found, lowered = {}, {}
    for npu in NPUS:
        (folder / npu).mkdir(parents=True)
        same = npu.startswith(POOL_AS_DEPTHWISE)  # what decides the lowering: the one rewrite that differs
        if same not in lowered:
            params = {"npu": npu, "system": None, "memory_mode": None, "int16": ()}
            lowered[same], record = compiled(program, params, images, folder / npu)
        else:
            record = estimate(lowered[same], npu, out_dir=folder / npu)
        found[npu] = {**record, "by_type": cycles_by_type(folder / npu / "vela_per_layer.csv")}
    return found


def cycles_by_type(per_layer: Path) -> Counter:
    """Vela's estimated cycles summed by the input model's operator type (Vela's per-layer CSV)."""
    cycles = Counter()
    with per_layer.open() as f:
        for row in csv.DictReader(f):
            cycles[row["Original Operator"]] += float(row["Op Cycles"])
    return cycles


def measured(name: str, work: Path, runs: int) -> list[dict]:
    """One row per variant of `name`: MACs, Vela's estimates and placement, ExecuTorch ms; or the refusal."""
    start = time.perf_counter()
    base_plan = planned(work, name, "")
    original = Stages(base_plan, Cache(work / ".cache"), Progress()).loaded[0]
    rows, sessions = [], {}
    for label, passes in variants(original.structure).items():
        row = {"model": name, "variant": label}
        rows.append(row)
        try:
            program = compressed(planned(work, name, passes), original)
        except EvcError as e:
            row["refused"] = str(e).splitlines()[0]
            print(f"{name}, {label}: refused: {row['refused']}", file=sys.stderr)
            continue
        row["macs"] = macs(program)
        stem = f"{name}_{label}".replace(" ", "_").replace("+", "_")
        row["vela"] = on_npus(program, work / stem)
        Pte().export(program, work / f"{stem}.pte")
        sessions[label] = Pte().session(work / f"{stem}.pte", threads=1)
        print(f"{name}, {label}: lowered in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    feed = np.random.default_rng(0).standard_normal(original.input.shape, dtype=np.float32)
    medians = interleaved(sessions, feed, runs, warmups=5, rotate=True)
    for row in rows:
        if row["variant"] in medians:
            row["pte_ms"] = medians[row["variant"]]
    print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> None:
    head = ["model", "variant", "MACs (G)", "ideal"]
    for npu in NPUS:
        head += [f"{npu} est. ms", f"{npu} realized / ideal", f"{npu} ops on CPU"]
    head += ["ExecuTorch ms", "ExecuTorch realized / ideal"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    bases = {row["model"]: row for row in rows if row["variant"] == "base"}
    for row in rows:
        cells = [row["model"], row["variant"]]
        if "refused" in row:
            print("| " + " | ".join(cells + [f"refused: {row['refused']}"] + [""] * (len(head) - 3)) + " |")
            continue
        base = bases[row["model"]]
        ideal = base["macs"] / row["macs"]
        cells += [f"{row['macs'] / 1e9:.3f}", f"{ideal:.2f}"]
        for npu in NPUS:
            ms, base_ms = row["vela"][npu]["inference_ms"], base["vela"][npu]["inference_ms"]
            cells += [f"{ms:.1f}", f"{base_ms / ms / ideal:.2f}", str(row["vela"][npu]["ops"]["cpu"])]
        cells += [f"{row['pte_ms']:.1f}", f"{base['pte_ms'] / row['pte_ms'] / ideal:.2f}"]
        print("| " + " | ".join(cells) + " |")


def cpu_operators(rows: list[dict]) -> None:
    """Which operators each variant leaves to the CPU, and the first line of Vela's reason for each kind."""
    for row in rows:
        for npu in NPUS:
            ops = row.get("vela", {}).get(npu, {}).get("cpu_ops", [])
            kinds = {}
            for op in ops:
                kinds.setdefault(op["op"], [0, (op["reasons"] or ["-"])[0]])[0] += 1
            for kind, (count, why) in kinds.items():
                print(f"  {row['model']}, {row['variant']}, {npu}: {count} × {kind}: {why}")


def cycles_table(rows: list[dict], top: int = 6) -> None:
    """Where Vela's cycles go: the operator types that take most of the base model's, in each variant."""
    done = [row for row in rows if "vela" in row]
    labels = list(dict.fromkeys(row["variant"] for row in done))
    print("| model | NPU | operator (TFLite) | " + " | ".join(f"{v}, M cycles" for v in labels) + " |")
    print("|" + "---|" * (3 + len(labels)))
    for name in dict.fromkeys(row["model"] for row in done):
        variant = {row["variant"]: row["vela"] for row in done if row["model"] == name}
        for npu in NPUS:
            base = variant["base"][npu]["by_type"]
            total = sum(base.values())
            for op, cycles in base.most_common(top):
                cells = [f"{cycles / 1e6:.1f} ({cycles / total:.0%})"]
                cells += [f"{variant[v][npu]['by_type'][op] / 1e6:.1f}" if v in variant else "" for v in labels[1:]]
                print(f"| {name} | {npu} | {op} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed runs of each .pte (after 5 warm-ups)")
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=tuple(MODELS))
    args = parser.parse_args()

    torch.manual_seed(0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        rows = [row for name in args.models for row in measured(name, Path(folder), args.runs)]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    from importlib.metadata import version

    print(f"\nmachine: {platform.machine()}, {cpu}, {len(os.sched_getaffinity(0))} cores; torch {torch.__version__}, "
          f"Vela {version('ethos-u-vela')}, ExecuTorch {version('executorch')}; random weights, 224×224; Vela in "
          f"each NPU's default system; ExecuTorch fp32 at 1 thread, median of {args.runs} runs after 5 warm-ups, "
          f"variants interleaved; {time.perf_counter() - start:.0f} s in all\n")
    table(rows)
    print("\nVela's estimated cycles by operator type, the base model's largest (share of its total):\n")
    cycles_table(rows)
    print("\noperators Vela left to the CPU:")
    cpu_operators(rows)


if __name__ == "__main__":
    main()
