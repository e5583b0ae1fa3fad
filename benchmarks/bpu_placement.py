"""Where every node of full-size ViTs runs on the RDK X5, before and after evc's BPU-native lowering.

    .venv/bin/python benchmarks/bpu_placement.py     # a few minutes on 2 cores

For each model (random weights: placement does not depend on them), the ONNX
export as it was lowered before the rewrites (Softmax and uneven Splits only)
and after them, each judged by the same operator check the X5 bundle's
op_check.json comes from (the device's operator table, evc/targets/devices/
rdk_x5.json), and the rewritten model's largest difference from PyTorch on
one image. The passes are those of the specs in specs/, and the token passes
at the strengths the issue measured (token_merge r = 8 on deit_small).
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The models and the judging, shared with tests/targets/test_bpu_native.py, which checks the same at full size.
from tests.targets.bpu_models import FULL_SIZE, lowered, max_abs_diff  # noqa: E402


def main() -> None:
    print(f"machine: {platform.machine()}, torch {torch.__version__}, onnx {onnx.__version__}\n")
    print("| model | nodes | on the CPU before | on the CPU after | unsupported after | max abs diff to PyTorch |")
    print("|---|---|---|---|---|---|")
    for case in FULL_SIZE.values():
        start = time.perf_counter()
        program = case.make()
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.onnx"
            model, after, before = lowered(program, path)
            diff = max_abs_diff(program, path, n=1)
        print(f"| {case.label} | {len(model.graph.node)} | {before['summary']['cpu']} | {after['summary']['cpu']} "
              f"| {after['summary']['unsupported']} | {diff:.1e} |", flush=True)
        print(f"{case.label}: {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
