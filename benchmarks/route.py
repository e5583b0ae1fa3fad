"""How evc's modules follow the route: imports against it and import cycles, and how `evc build` walks them.

    .venv/bin/python benchmarks/route.py [--against REV]

Reads every import statement of evc's modules (inside functions too, as
tests/test_house.py does) and counts imports against the route (a stage
importing a later one) and the modules caught in import cycles. Then builds
the small two-block ViT of the tests (a cpu ONNX target and a phone
TFLite target, head_prune and ffn_prune) in a fresh
process under `sys.setprofile`, and records every call from one evc module
into another. Modules directly in evc/ (the driver, the CLI, errors, keys,
the cache, the registry, progress, context) are the core beside the route
and are left out; the rest are placed on the route
spec → model → ir → passes → runtime → targets → bundle → tools. It prints:

- calls against the route: distinct (caller → callee) module pairs where the
  caller's stage comes before the callee's (a stage that reaches into a later
  one: the passes timing a model, lowering writing a bundle; a spec check
  running a plug-in's own check through the registry counts too);
- back and forth: distinct pairs of modules of different stages that each
  call the other (A calls B, which calls back into A);
- modules entered, and distinct module pairs called.

The static counts beside them: imports against the route, modules caught in
import cycles, and imports of a plug-in module (one that registers a pass,
format or device) by a module that is not one.

With `--against REV`, the same build by evc as it was at that git revision
(a temporary checkout run with this environment's libraries), its modules
placed on the route by where they live now.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.test_house import cycles, import_graph, modules  # noqa: E402  (the house test's reading of imports)

REGISTERS = re.compile(r"^@register_(pass|format|device)\(", re.M)  # a plug-in module
STAGES = ("spec", "model", "ir", "passes", "runtime", "targets", "bundle", "tools")
# Where modules that have since moved lived before the packages: old name -> stage.
MOVED = {"check": "spec", "plan": "spec", "params": "spec", "blocks": "spec", "load": "model", "hub": "model",
         "hf": "model", "preprocess": "model", "data": "model", "surgery": "passes", "tokens": "passes",
         "train": "passes", "budget": "passes", "compress": "passes", "parity": "runtime", "evaluate": "runtime",
         "collab": "runtime", "profile": "runtime", "lower": "targets", "artifact": "targets", "bundle": "bundle",
         "scripts": "bundle", "bench": "tools", "explain": "tools", "diff": "tools", "report": "tools",
         "reference": "tools"}

SPEC = """evc 1
model small {
    source = timm("vit_tiny_patch16_224", img_size = 32, patch_size = 8, depth = 2, num_classes = 10)
    input = image(32, 32)
}
compress {
    head_prune { keep = 2/3 }
    ffn_prune  { keep = 50% }
}
target cpu { device = cpu, format = onnx, runs = 3, warmups = 1 }
target phone { device = android, format = tflite }
"""

TRACE = r"""
import json, sys
from pathlib import Path
root = sys.argv[1]
edges = {}

def module(frame):
    name = frame.f_globals.get("__name__", "")
    return name if name.startswith("evc") and frame.f_code.co_filename.startswith(root) else None

def profile(frame, event, arg):
    if event != "call" or frame.f_back is None:
        return
    callee, caller = module(frame), module(frame.f_back)
    if callee and caller and callee != caller:
        edges[(caller, callee)] = edges.get((caller, callee), 0) + 1

from evc.cli import main
sys.setprofile(profile)
code = main(["build", sys.argv[2], "--out", sys.argv[3], "--force"])
sys.setprofile(None)
print(json.dumps({"code": code, "edges": [[a, b, n] for (a, b), n in edges.items()]}))
"""


def stage(name: str) -> str | None:
    """The module's stage on the route (by where it lives now), or None for the core beside it."""
    parts = name.split(".")
    if len(parts) < 2:
        return None
    return parts[1] if parts[1] in STAGES else MOVED.get(parts[1])


def measure(tree: Path, work: Path) -> dict:
    spec = work / "route.evc"
    spec.write_text(SPEC)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", TRACE, str(tree / "evc"), str(spec), str(work / "out")],
                          capture_output=True, text=True, env=env, cwd=tree)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    record = json.loads(done.stdout.splitlines()[-1])
    edges = {(a, b) for a, b, _ in record["edges"] if stage(a) and stage(b)}
    against = sorted((a, b) for a, b in edges if _later(a, b))
    back = sorted({tuple(sorted(e)) for e in edges if (e[1], e[0]) in edges and stage(e[0]) != stage(e[1])})
    graph = import_graph(tree)
    imports_against = sorted((a, b) for a, others in graph.items() for b in others
                             if stage(a) and stage(b) and _later(a, b))
    in_cycles = {m for cycle in cycles(graph) for m in cycle}
    known = modules(tree)
    plugins = {m for m, path in known.items() if REGISTERS.search(path.read_text())}
    naming = sorted((a, b) for a, others in graph.items() if a not in plugins for b in others & plugins)
    return {"against": against, "back": back, "modules": len({m for e in edges for m in e}), "pairs": len(edges),
            "imports_against": imports_against, "in_cycles": sorted(in_cycles), "naming": naming}


def _later(a: str, b: str) -> bool:
    """Whether module b's stage comes after module a's on the route."""
    return STAGES.index(stage(a)) < STAGES.index(stage(b))


def checkout(rev: str, folder: Path) -> Path:
    subprocess.run(["git", "worktree", "add", "--detach", str(folder), rev], cwd=ROOT, check=True,
                   capture_output=True)
    # Before the packages, evc.passes and evc.targets were installed from passes/ and targets/ beside evc/.
    for name in ("passes", "targets"):
        if (folder / name).is_dir() and not (folder / "evc" / name).exists():
            (folder / "evc" / name).symlink_to(folder / name)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", help="a git revision to measure beside this tree")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        if args.against:
            old = checkout(args.against, work / "old")
            try:
                (work / "a").mkdir()
                rows.append((f"evc at {args.against}", measure(old, work / "a")))
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=True)
        (work / "b").mkdir()
        rows.append(("evc now", measure(ROOT, work / "b")))
    print("| evc | imports against the route | modules in import cycles | core imports of plug-ins "
          "| calls against the route (evc build) | back and forth | modules entered | module pairs called |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {len(r['imports_against'])} | {len(r['in_cycles'])} | {len(r['naming'])} | "
              f"{len(r['against'])} | {len(r['back'])} | {r['modules']} | {r['pairs']} |")
    for name, r in rows:
        print(f"\n{name}:")
        print("  imports against the route: " + (", ".join(f"{a} -> {b}" for a, b in r["imports_against"])
                                                or "none"))
        print("  in import cycles: " + (", ".join(r["in_cycles"]) or "none"))
        print("  core imports of plug-ins: " + (", ".join(f"{a} -> {b}" for a, b in r["naming"]) or "none"))
        print("  against the route: " + (", ".join(f"{a} -> {b}" for a, b in r["against"]) or "none"))
        print("  back and forth: " + (", ".join(f"{a} <-> {b}" for a, b in r["back"]) or "none"))


if __name__ == "__main__":
    main()
