"""How long `evc build` takes against the same work done by hand, for deit_tiny to ONNX.

    .venv/bin/python benchmarks/build_time.py [--rounds 3]

Each round runs, side by side in fresh processes (imports included, as a user
waits for them):
- `evc build` of a spec naming deit_tiny and a cpu ONNX target, with an empty build folder;
- the same work by hand: timm create + torch.onnx.export + an ONNX Runtime
  check on the same 8 images;
- `evc build` again, which finds everything in the cache;
- `evc check`, beside a bare `python -c pass` (Python's own start-up);
- `evc explain` of deit_tiny with head_prune and ffn_prune, with an empty
  cache (it loads the model and runs the passes), then again after
  `evc build` of that spec (untimed) has filled the cache.
It prints the median of the rounds. This machine is shared and noisy:
compare the ratios, not the absolute times.

    .venv/bin/python benchmarks/build_time.py --against 59cc343

also times, in the same rounds, `evc build` of the same spec by evc as it was
at that git revision (a temporary checkout run with this environment's
libraries), so a change to capture or recognition is measured against the
code before it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# deit_tiny to ONNX and nothing else: the work the hand path does.
SPEC_TEXT = """evc 1
model deit_tiny {
    source = timm("deit_tiny_patch16_224")
    input  = image(224, 224, mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225])
}
target cpu { device = cpu, format = onnx }
"""
# The same with passes: what `evc explain` shows before → after.
PRUNED_TEXT = SPEC_TEXT.replace("target cpu", """compress {
    head_prune { keep = 2/3, score = l1 }
    ffn_prune  { keep = 70%, score = l1 }
}
target cpu""")

BY_HAND = """
import numpy as np, onnxruntime as ort, timm, torch, sys
model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), sys.argv[1], dynamo=False, opset_version=17,
                  input_names=["input"], output_names=["logits"])
images = np.random.default_rng(0).random((8, 3, 224, 224), dtype=np.float32)
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
onnx_logits = np.concatenate([session.run(None, {"input": x[None]})[0] for x in images])
with torch.inference_mode():
    torch_logits = model(torch.from_numpy(images)).numpy()
assert np.abs(onnx_logits - torch_logits).max() < 1e-4
"""

# What evc does beyond the hand path: onnxslim on the same export, timed alone.
SLIM = """
import sys, time, onnxslim
start = time.perf_counter()
onnxslim.slim(sys.argv[1])
print(time.perf_counter() - start)
"""


# As an installed evc runs: with its modules' bytecode cached (pip compiles an install's; a checkout's is written
# on its first run), even where the environment says not to write it (PYTHONDONTWRITEBYTECODE, as here).
BYTECODE = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(command: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT, env=env)
    return time.perf_counter() - start


def checkout(revision: str, scratch: Path) -> dict:
    """The environment that runs evc as it was at `revision`: a checkout first on PYTHONPATH, its
    plug-in folders linked where the installed package maps them (evc.passes, evc.targets)."""
    tree = scratch / "against"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), revision], check=True, capture_output=True,
                   cwd=ROOT)
    for package in ("passes", "targets"):  # before evc/passes and evc/targets, they sat beside evc/
        if (tree / package).is_dir() and not (tree / "evc" / package).exists():
            (tree / "evc" / package).symlink_to(tree / package)
    return {**os.environ, "PYTHONPATH": str(tree)}


def one_round(scratch: Path, against: dict | None) -> dict[str, float]:
    out = Path(tempfile.mkdtemp(dir=scratch))
    spec = out / "deit_tiny_cpu.evc"
    spec.write_text(SPEC_TEXT)
    evc = [sys.executable, "-m", "evc"]
    subprocess.run([*evc, "check", str(spec)], check=True, capture_output=True, cwd=ROOT, env=BYTECODE)  # compiles
    times = {}
    if against is not None:
        earlier = Path(tempfile.mkdtemp(dir=scratch))
        times["evc build (earlier revision)"] = timed([*evc, "build", str(spec), "--out", str(earlier)],
                                                      against)
        old_check, old_env = [*evc, "check", str(spec)], {**BYTECODE, "PYTHONPATH": against["PYTHONPATH"]}
        subprocess.run(old_check, check=True, capture_output=True, cwd=ROOT, env=old_env)  # compiles its bytecode
        times["evc check (earlier revision)"] = timed(old_check, old_env)
    times |= {
        "evc build": timed([*evc, "build", str(spec), "--out", str(out)]),
        "by hand": timed([sys.executable, "-c", BY_HAND, str(out / "by_hand.onnx")]),
        "evc build (from cache)": timed([*evc, "build", str(spec), "--out", str(out)]),
        "evc check": timed([*evc, "check", str(spec)], BYTECODE),
        "bare start": timed([sys.executable, "-c", "pass"], BYTECODE),
    }
    pruned = out / "deit_tiny_pruned.evc"
    pruned.write_text(PRUNED_TEXT)
    times["evc explain (empty cache)"] = timed([*evc, "explain", str(pruned), "--out", str(out)])
    subprocess.run([*evc, "build", str(pruned), "--out", str(out)], check=True, capture_output=True, cwd=ROOT)
    times["evc explain (from cache)"] = timed([*evc, "explain", str(pruned), "--out", str(out)])
    times["check ratio"] = times["evc check"] / times["bare start"]
    slim = subprocess.run([sys.executable, "-c", SLIM, str(out / "by_hand.onnx")], check=True,
                          capture_output=True, text=True)
    times["onnxslim"] = float(slim.stdout.strip().splitlines()[-1])
    times["ratio"] = times["evc build"] / times["by hand"]
    if against is not None:
        times["against"] = times["evc build"] / times["evc build (earlier revision)"]
        times["check ratio (earlier revision)"] = times["evc check (earlier revision)"] / times["bare start"]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--against", metavar="REVISION", help="also time evc build as of this git revision")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        against = checkout(args.against, Path(scratch)) if args.against else None
        try:
            rounds = [one_round(Path(scratch), against) for _ in range(args.rounds)]
        finally:
            if against is not None:
                subprocess.run(["git", "worktree", "remove", "--force", str(Path(scratch) / "against")], cwd=ROOT)
    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    ratio = median["ratio"]
    rows = [
        ("evc build, deit_tiny → ONNX, empty cache", f"{median['evc build']:.2f} s", ""),
        ("by hand: timm + torch.onnx.export + ONNX Runtime check", f"{median['by hand']:.2f} s", ""),
        ("ratio evc / by hand (median of the rounds' ratios)", f"{ratio:.2f}", _goal(ratio <= 1.3, "≤ 1.3")),
        ("of which onnxslim alone (evc simplifies, the hand path does not)", f"{median['onnxslim']:.2f} s", ""),
        ("evc build, rebuild from cache", f"{median['evc build (from cache)']:.2f} s",
         _goal(median["evc build (from cache)"] <= 2, "≤ 2 s")),
        ("evc check", f"{median['evc check']:.2f} s", _goal(median["evc check"] <= 0.5, "≤ 0.5 s")),
        ("python -c pass (a bare start)", f"{median['bare start']:.2f} s", ""),
        ("ratio evc check / bare start (median of the rounds' ratios)", f"{median['check ratio']:.2f}",
         _goal(median["check ratio"] <= 2.5, "≤ 2.5")),
        ("evc explain, deit_tiny with head_prune and ffn_prune, empty cache",
         f"{median['evc explain (empty cache)']:.2f} s", ""),
        ("evc explain, the same after evc build (from cache)", f"{median['evc explain (from cache)']:.2f} s",
         _goal(median["evc explain (from cache)"] <= 2, "≤ 2 s")),
    ]
    if args.against:
        rows += [
            (f"evc build as of {args.against}, empty cache", f"{median['evc build (earlier revision)']:.2f} s", ""),
            (f"ratio evc build now / as of {args.against} (median of the rounds' ratios)", f"{median['against']:.2f}",
             _goal(median["against"] <= 1.1, "≤ 1.10")),
            (f"evc check as of {args.against}", f"{median['evc check (earlier revision)']:.2f} s", ""),
            (f"ratio evc check as of {args.against} / bare start", f"{median['check ratio (earlier revision)']:.2f}",
             ""),
        ]
    print(f"machine: {platform.machine()}, {_cpu()}, {_cores()} cores, Python {platform.python_version()}; "
          f"median of {args.rounds} rounds")
    print()
    print("| measure | value | goal |")
    print("|---|---|---|")
    for name, value, goal in rows:
        print(f"| {name} | {value} | {goal} |")


def _goal(met: bool, text: str) -> str:
    return f"{text}: {'met' if met else 'missed'}"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    main()
