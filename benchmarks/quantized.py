"""Quantized artifacts side by side: ONNX Runtime fp32, int8 static and dynamic; LiteRT fp32, fp16, dynamic, int8.

    python examples/digits/prepare.py             # once: the digits data and trained ViT
    .venv/bin/python benchmarks/quantized.py [--runs 30] [--digits examples/digits]

Two models, each lowered as evc's targets lower it (`export_onnx`, then
`evc/targets/_onnx_quantize.quantize`; litert-torch `convert`, then
ai-edge-quantizer `quantize`):

    deit_small   timm's deit_small_patch16_224 at random weights, 224×224; calibrated
                 (int8) on 16 synthetic images, compared on 16 others
    digits       examples/digits' ViT as prepare.py trains it (patch 4, width 96,
                 depth 6, 32×32); calibrated on 64 of its training images, compared
                 and scored on its 359 validation images

For each artifact: size, the median ms per image at 1 thread (all of a
model's artifacts taking turns run by run, so that the machine's noise falls
on all alike), the worst and mean per-sample cosine of its logits to
PyTorch's, top-1 agreement with PyTorch, and on digits its top-1 on the
labels against the PyTorch model's. The goal (issue 15): ONNX int8 static at
least 1.5× faster than ONNX fp32 on deit_small, losing at most 1 point of
top-1 on digits.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch
from _timing import interleaved  # benchmarks/, the script's own folder
from safetensors.torch import load_file

from evc.ir.program import Program
from evc.runtime.parity import compare
from evc.spec.plan import ImageInput
from evc.targets._onnx_quantize import quantize as ort_quantize
from evc.targets.onnx import Onnx, export_onnx
from evc.targets.tflite import Tflite, convert
from evc.targets.tflite import quantize as litert_quantize

DIGITS = Path(__file__).resolve().parent.parent / "examples" / "digits"
sys.path.insert(0, str(DIGITS))
from prepare import digits_vit, read_folder  # noqa: E402  (the example's own model and preprocessing)

THREADS = 1
ARTIFACTS = (("onnx", "fp32"), ("onnx", "int8"), ("onnx", "dynamic"),
             ("tflite", "fp32"), ("tflite", "float16"), ("tflite", "dynamic"), ("tflite", "int8"))


def lowered(program: Program, calibration: np.ndarray, work: Path) -> dict[tuple[str, str], Path]:
    """Every artifact of the table, written as evc's onnx and tflite formats write them."""
    paths = {("onnx", "fp32"): work / "model.onnx"}
    export_onnx(program, paths["onnx", "fp32"], 17)
    for mode in ("int8", "dynamic"):
        paths["onnx", mode] = work / f"model_{mode}.onnx"
        ort_quantize(paths["onnx", "fp32"], paths["onnx", mode], mode, calibration if mode == "int8" else None)
    start = time.perf_counter()
    fp32 = convert(program)
    print(f"  converted to TFLite in {time.perf_counter() - start:.0f} s", flush=True)
    for mode in ("fp32", "float16", "dynamic", "int8"):
        paths["tflite", mode] = work / f"model_{mode}.tflite"
        start = time.perf_counter()
        model = fp32 if mode == "fp32" else litert_quantize(fp32, mode, calibration if mode == "int8" else None)
        paths["tflite", mode].write_bytes(model)
        if mode != "fp32":
            print(f"  TFLite {mode} in {time.perf_counter() - start:.0f} s", flush=True)
    return paths


def rows(name: str, module: torch.nn.Module, size: int, calibration: np.ndarray, images: np.ndarray,
         labels: np.ndarray | None, runs: int, work: Path) -> list[dict]:
    """One row per artifact of `module`: size, ms, cosine and top-1 against PyTorch on `images`."""
    print(f"{name}: lowering", flush=True)
    program = Program.from_module(module.eval(), ImageInput(size, size))
    paths = lowered(program, calibration, work / name)
    formats = {"onnx": Onnx(), "tflite": Tflite()}
    with torch.inference_mode():
        reference = module(torch.from_numpy(images)).numpy()
    table = []
    for fmt, mode in ARTIFACTS:
        outputs = formats[fmt].run(paths[fmt, mode], images)
        parity = compare(reference, outputs)
        cosines = np.sum(reference * outputs, 1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(outputs, axis=1))
        row = {"model": name, "format": fmt, "mode": mode, "mb": paths[fmt, mode].stat().st_size / 1e6,
               "worst_cosine": parity.cosine, "mean_cosine": float(cosines.mean()),
               "top1_agreement": parity.top1_agreement}
        if labels is not None:
            row["top1"] = float((outputs.argmax(1) == labels).mean())
            row["reference_top1"] = float((reference.argmax(1) == labels).mean())
        table.append(row)
    print(f"{name}: timing {len(ARTIFACTS)} artifacts, {runs} runs each, interleaved", flush=True)
    sessions = {key: formats[key[0]].session(paths[key], THREADS) for key in ARTIFACTS}
    # Rotated: a short model timed just after another one's turn ran up to 3× slower here, whichever it was.
    medians = interleaved(sessions, images[:1], runs, rotate=True)
    for row in table:
        row["ms"] = medians[row["format"], row["mode"]]
        row["speedup"] = medians["onnx", "fp32"] / row["ms"]
    return table


def deit_small(runs: int, work: Path) -> list[dict]:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    calibration, images = (rng.standard_normal((16, 3, 224, 224), dtype=np.float32) for _ in range(2))
    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    return rows("deit_small", model, 224, calibration, images, None, runs, work)


def digits(folder: Path, runs: int, work: Path) -> list[dict]:
    checkpoint = folder / "digits_vit.safetensors"
    if not checkpoint.exists():
        sys.exit(f"{checkpoint} is missing: run `python {DIGITS / 'prepare.py'} --out {folder}` first (about 3 "
                 "minutes)")
    model = digits_vit()
    model.load_state_dict(load_file(str(checkpoint)))
    train, _ = read_folder(folder / "data" / "train")
    images, labels = read_folder(folder / "data" / "val")
    calibration = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:64]].numpy()
    # A digits call takes 1 to 2 ms, in which a busy machine's noise is as large as the differences: 10× the runs.
    return rows("digits", model, 32, calibration, images.numpy(), labels.numpy(), 10 * runs, work)


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    flags = sorted(set(re.findall(r"\b(avx512[a-z0-9_]*|avx_vnni|amx_int8|avx2)\b", cpuinfo)))
    import ai_edge_litert

    return (f"machine: {platform.machine()}, {model.group(1) if model else 'unknown CPU'}, "
            f"{len(os.sched_getaffinity(0))} cores, load average {open('/proc/loadavg').read().split()[0]} at the "
            f"start; int8-relevant flags: {', '.join(flags)}; ONNX Runtime {ort.__version__}, LiteRT "
            f"{ai_edge_litert.__version__}, torch {torch.__version__}, timm {timm.__version__}")


def print_table(table: list[dict]) -> None:
    print("\n| model | format | mode | size (MB) | ms, 1 thread | × ONNX fp32 | worst cosine | mean cosine "
          "| top-1 agreement | top-1 (digits val) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in table:
        top1 = (f"{row['top1']:.2%} ({100 * (row['top1'] - row['reference_top1']):+.2f})" if "top1" in row else "")
        print(f"| {row['model']} | {row['format']} | {row['mode']} | {row['mb']:.2f} | {row['ms']:.2f} "
              f"| {row['speedup']:.2f} | {row['worst_cosine']:.5f} | {row['mean_cosine']:.5f} "
              f"| {row['top1_agreement']:.1%} | {top1} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--digits", type=Path, default=DIGITS, help="where prepare.py wrote data/ and the checkpoint")
    args = parser.parse_args()
    print(machine(), flush=True)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        (work / "deit_small").mkdir()
        (work / "digits").mkdir()
        table = digits(args.digits, args.runs, work) + deit_small(args.runs, work)
    print(f"\nmedian of {args.runs} runs (digits: {10 * args.runs}) after 10 warm-ups, {THREADS} thread, one "
          "image per call; a model's artifacts interleaved run by run, each round starting one later; top-1 in "
          "brackets: points against the PyTorch model's")
    print_table(table)
    deit = {row["mode"]: row for row in table if row["model"] == "deit_small" and row["format"] == "onnx"}
    digit = {row["mode"]: row for row in table if row["model"] == "digits" and row["format"] == "onnx"}
    speedup, lost = deit["int8"]["speedup"], 100 * (digit["int8"]["reference_top1"] - digit["int8"]["top1"])
    print(f"\ngoal: ONNX int8 static ≥ 1.5× ONNX fp32 on deit_small: {speedup:.2f}× "
          f"({'met' if speedup >= 1.5 else 'missed'}); ≤ 1 point top-1 lost on digits: {lost:+.2f} points "
          f"({'met' if lost <= 1 else 'missed'})")


if __name__ == "__main__":
    main()
