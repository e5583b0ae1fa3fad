"""The command line: `evc build|check|explain|bench|diff|report|profile|serve|infer`.

Exit codes: 0 done, 1 the build (or a collaborative run) failed, 2 bad input. Every EvcError becomes
its rendered text here and nowhere else.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

from evc.errors import EvcError, InputError


def _read_plan(path: str):
    from evc.spec.check import parse_and_check

    spec = Path(path)
    try:
        text = spec.read_text()
    except FileNotFoundError:
        raise InputError(f"no such spec file: {spec}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read spec file {spec}: {e}") from None
    return parse_and_check(text, spec)


def cmd_check(args) -> int:
    plan = _read_plan(args.spec)
    passes = ", ".join(p.name for p in plan.passes) or "no passes"
    targets = ", ".join(f"{t.name} ({t.device}, {t.format})" for t in plan.targets)
    print(f"{args.spec}: ok: model {plan.model.name} = {plan.model.source}; {passes}; targets {targets}")
    return 0


def _print_json(document) -> None:
    """One JSON document on stdout: what --json prints (docs/json.md has each command's shape)."""
    import json

    print(json.dumps(document, indent=1))


def _pin(plan, results, quiet: bool = False) -> str:
    from evc.keys import derive
    from evc.passes.budget import lock_path, write_lock

    if plan.budget is None:
        raise InputError(f"--pin: {plan.path} has no budget in its compress block: there is no search to pin")
    record = {k: v for k, v in results[0].manifest["budget"].items() if k != "pinned"}
    write_lock(plan.path, derive(plan).budget, record)
    if not quiet:
        print(f"pinned: {lock_path(plan.path)}")
    return str(lock_path(plan.path))


def cmd_profile(args) -> int:
    """The latency table of the spec's model on one of its targets, measured here (or from the cache)."""
    from rich.console import Console

    from evc.cache import Cache
    from evc.driver import Stages
    from evc.progress import Progress
    from evc.registry import DEVICES, BoardTimed, RemoteTimed
    from evc.runtime.profile import table_for

    plan = _read_plan(args.spec)
    names = [t.name for t in plan.targets]
    if args.target not in names:
        raise InputError(f"--target {args.target}: {args.spec} has no such target (it has: {', '.join(names)})")
    target = next(t for t in plan.targets if t.name == args.target)
    device = DEVICES[target.device].plugin
    if args.results and not isinstance(device, BoardTimed):
        raise InputError(f"--results: target {args.target} is timed by evc itself; --results reads back what a "
                         "board kit's scripts logged (rdk_x5 and jetson targets)")
    if isinstance(device, RemoteTimed) and not (args.serial or target.params.get("serial")):
        raise InputError(f"--target {args.target} is a phone: give --serial SERIAL (adb devices lists them) and "
                         f"--binary, the {device.binary(target.format)} built for its ABI")
    progress = Progress(Console(stderr=True))
    cache = Cache(Path(args.out) / ".cache", warn=progress.warn)
    stages = Stages(plan, cache, progress)
    keys, program = stages.keys, stages.original
    program.require_structure("evc profile")
    if isinstance(device, BoardTimed):
        from evc.bundle.kit import board_kit, read_results

        folder = Path(args.out) / plan.stem / f"profile-{target.name}"
        if args.results:
            table = read_results(plan, target, program, Path(args.results), keys.load, cache)
        else:
            names = board_kit(plan, target, program, folder, keys, progress)
            steps = " then ".join(f"`./profile.sh {where}` on the {where.replace('pc', 'PC')}"
                                  for where, _ in device.steps)
            print(f"{folder}: {len(names)} models to time on the {target.device}: {steps}; then bring the folder "
                  f"back and run `evc profile {args.spec} --target {target.name} --results {folder}`")
            return 0
    else:
        serial = args.serial or (target.params.get("serial") if isinstance(device, RemoteTimed) else None)
        table = table_for(plan, args.target, program, cache, keys.load, progress, serial,
                          Path(args.binary) if args.binary else None)
    if args.json:
        _print_json(table.to_dict())
        return 0
    print(f"{plan.model.name} on target '{table.target}' ({table.runtime}, {table.threads} thread(s)): "
          f"{table.base_ms:.3f} ms without blocks, then per block, ms:")
    print("heads \\ MLP units " + " ".join(f"{u:>7}" for u in table.units))
    for heads, row in zip(table.heads, table.block_ms):
        print(f"{heads:>17} " + " ".join(f"{ms:7.3f}" for ms in row))
    print(f"the model as loaded: {table.predict(program.structure):.3f} ms predicted")
    return 0


def cmd_verify(args) -> int:
    """Each bundle against its manifest: exit 1 when a file it lists is missing or differs."""
    from evc.bundle.verify import verify

    failed = False
    for bundle in map(Path, args.bundles):
        problems = verify(bundle)
        if problems:
            failed = True
            print(f"{bundle}: does not match its manifest:", file=sys.stderr)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
        else:
            print(f"{bundle}: ok, every file matches manifest.json")
    return 1 if failed else 0


def cmd_build(args) -> int:
    from evc.driver import build

    plan = _read_plan(args.spec)
    unknown = [t for t in args.target or () if t not in {x.name for x in plan.targets}]
    if unknown:
        raise InputError(f"--target {unknown[0]}: {args.spec} has no such target "
                         f"(it has: {', '.join(t.name for t in plan.targets)})")
    from rich.console import Console

    from evc.progress import Progress
    from evc.runtime.parity import describe
    from evc.tools.report import estimate_line

    rank = _join_torchrun()
    progress = Progress(Console(stderr=True, quiet=rank != 0))
    results = build(plan, Path(args.out), force=args.force, only=args.target, progress=progress, main=rank == 0)
    if rank != 0:
        return 0
    if args.json:
        pinned = _pin(plan, results, quiet=True) if args.pin else None
        _print_json({"schema": "evc.build/1", "spec": str(plan.path), "pinned": pinned,
                     "bundles": [{"target": r.target, "path": str(r.bundle), "cached": r.cached,
                                  "manifest": r.manifest} for r in results]})
        return 0
    for result in results:
        state = "up to date" if result.cached else "built"
        print(f"{state}: {result.bundle}")
        for a in result.manifest["artifacts"]:
            print(f"    {a['path']}: {a['size'] / 1e6:.1f} MB, parity {describe(a['parity'], a.get('gate'))}")
            if "ethos_u" in a:
                print(f"    {estimate_line(a['ethos_u'])}")
    if results:
        print(f"report: {results[0].bundle.parent / 'report.html'}")
    if args.pin:
        _pin(plan, results)
    evaluated = [r for r in results if "evaluation" in r.manifest]
    if evaluated:
        from evc.runtime.evaluate import table

        artifacts = [(f"{r.target}: {a['path']}", a["accuracy"]) for r in evaluated for a in r.manifest["artifacts"]
                     if "accuracy" in a]
        _console().print(table(evaluated[0].manifest["evaluation"], artifacts))
    return 0


def _join_torchrun() -> int:
    """This process's rank when torchrun started several, after joining their group; else 0."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return 0
    from evc.passes.train import init_distributed

    return init_distributed()[0]


def _console():
    """Standard output for tables: wide enough not to wrap them when piped to a file."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


def cmd_explain(args) -> int:
    from evc.tools.explain import explain

    explain(_read_plan(args.spec), Path(args.out), _console(), as_json=args.json)
    return 0


def cmd_bench(args) -> int:
    from rich.console import Console

    from evc.tools.bench import bench, bench_record

    console = Console(quiet=True) if args.json else _console()
    rows = bench(Path(args.bundle), runs=args.runs, threads=args.threads, serial=args.serial, console=console)
    if args.json:
        _print_json(bench_record(Path(args.bundle), rows, args.serial))
    return 0


def cmd_diff(args) -> int:
    from evc.tools.diff import bundles, compare, text, threshold

    thresholds = [threshold(t) for t in args.fail_on or ()]  # a bad expression stops before anything is read
    report = compare(bundles(Path(args.old)), bundles(Path(args.new)), thresholds)
    if not report["targets"]:
        raise InputError(f"{args.old} and {args.new} have no target in common to compare")
    if args.json:
        _print_json(report)
    else:
        print(text(report))
    return 1 if report["failed"] else 0


def cmd_report(args) -> int:
    from evc.tools.report import write_report

    print(f"report: {write_report(Path(args.build))}")
    return 0


def cmd_serve(args) -> int:
    import threading

    from evc.runtime.collab.server import serve

    # Ctrl-C and SIGTERM set a flag that this thread waits on, rather than raising KeyboardInterrupt
    # wherever the main thread happens to be (inside gRPC's own waiting, it could leave a lock held and
    # the stop below waiting on it for ever). A signal while the model loads stops the server once it is up.
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    server = serve(Path(args.bundle), args.part, args.port, args.host, args.threads)
    print(f"serving part {args.part} of {args.bundle} on {server.address}", flush=True)
    while not stopping.wait(0.5):
        pass
    server.stop(grace=1).wait(2)
    print(f"stopped serving part {args.part}", file=sys.stderr)
    return 0


def cmd_infer(args) -> int:
    import json

    import numpy as np

    from evc.runtime.collab.contract import read
    from evc.runtime.collab.coordinator import Coordinator, parse_peers
    from evc.runtime.collab.images import read_batch

    bundle = Path(args.bundle)
    collab = read(bundle)
    if args.peers is None and not collab.peers:
        raise InputError(f"--peers: {bundle}'s collab.json places no parts (a target's `peers`): say where each "
                         "part is served, HOST:PORT,... in part order")
    peers = parse_peers(args.peers) if args.peers is not None else list(collab.peers)
    if args.deadline_ms is not None and not args.deadline_ms > 0:
        raise InputError(f"--deadline-ms {args.deadline_ms:g}: expected a positive number of milliseconds")
    batches = [(path, read_batch(Path(path), collab)) for path in args.images]  # every file read before any call
    rows = []
    with Coordinator(bundle, peers, None if args.deadline_ms is None else args.deadline_ms / 1e3) as coordinator:
        for path, images in batches:
            answer = coordinator.infer(images)
            names = [f"{path}[{i}]" for i in range(len(images))] if path.endswith(".npy") else [path]
            for name, logits in zip(names, answer.logits):
                row = {"image": name, "class": int(np.argmax(logits)), "degraded": answer.degraded,
                       "missing": list(answer.missing), "reasons": list(answer.reasons),
                       "batch_ms": round(answer.ms, 3), "parts_compute_ms": list(answer.compute_ms)}
                rows.append(row)
                if not args.json:
                    print(f"{name}: class {row['class']}" + (f", degraded: {'; '.join(answer.reasons)}"
                                                             if answer.degraded else ""), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="evc", description="A model-compression compiler for vision transformers.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("build", help="build one deployable bundle per target of a spec")
    p.add_argument("spec", help="the .evc spec file")
    p.add_argument("--out", default="build", help="where bundles go: OUT/<spec stem>/<target> (default: build)")
    p.add_argument("--target", action="append", metavar="NAME", help="build only this target (repeatable)")
    p.add_argument("--force", action="store_true", help="rebuild everything, ignoring the cache")
    p.add_argument("--pin", action="store_true", help="write what a budget's search chose to SPEC.lock beside the "
                                                      "spec; later builds read it instead of searching")
    p.add_argument("--json", action="store_true", help="print one JSON document: each bundle and its manifest")
    p.set_defaults(run=cmd_build)

    p = sub.add_parser("profile", help="measure a latency table for a target (what a latency budget reads)")
    p.add_argument("spec", help="the .evc spec file")
    p.add_argument("--target", required=True, help="the target to time: a cpu one here, an android one over adb; "
                                                   "for rdk_x5 and jetson, the models and scripts to time it there")
    p.add_argument("--results", help="a board kit's folder with the logs its scripts left: read them into the table")
    p.add_argument("--serial", help="an android target's phone (adb devices)")
    p.add_argument("--binary", help="the tool that times the target's format, built for the phone's ABI (default: "
                                    "./benchmark_model for tflite, ./executor_runner for pte)")
    p.add_argument("--out", default="build", help="where the cache is (default: build)")
    p.add_argument("--json", action="store_true", help="print the table as one JSON document")
    p.set_defaults(run=cmd_profile)

    p = sub.add_parser("verify", help="check bundles on disk against their manifests (every file's sha256)")
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="a bundle folder, e.g. build/deit_tiny_x5/x5")
    p.set_defaults(run=cmd_verify)

    p = sub.add_parser("check", help="check a spec without loading the model")
    p.add_argument("spec", help="the .evc spec file")
    p.set_defaults(run=cmd_check)

    p = sub.add_parser("explain", help="show the recognised model, what each pass does, and the targets")
    p.add_argument("spec", help="the .evc spec file")
    p.add_argument("--out", default="build", help="the build folder whose cache may be read (nothing is written)")
    p.add_argument("--json", action="store_true", help="print one JSON document: the model, passes, blocks, targets")
    p.set_defaults(run=cmd_explain)

    p = sub.add_parser("bench", help="benchmark a bundle's artifacts on this machine")
    p.add_argument("bundle", help="a bundle folder, e.g. build/deit_tiny_x5/cpu")
    p.add_argument("--runs", type=int, help="timed runs (default: the target's)")
    p.add_argument("--threads", nargs="+", help="thread counts, or 'all' (default: the target's)")
    p.add_argument("--serial", help="benchmark on this device over adb (Android bundles)")
    p.add_argument("--json", action="store_true", help="print one JSON document: a row per artifact and thread count")
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("diff", help="compare two builds' manifests per target; --fail-on gates a pipeline on them")
    p.add_argument("old", help="a manifest.json, a bundle folder, or a build folder of bundles (the baseline)")
    p.add_argument("new", help="the same for the build compared with it")
    p.add_argument("--fail-on", action="append", metavar="EXPR",
                   help="exit 1 when a change crosses EXPR: METRIC+N or METRIC-N, N in the metric's unit or with "
                        "%% relative to OLD, e.g. latency+5%%, top1-0.5, macs+0%%, size+10%% (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON document: each target's figures and "
                                                       "each threshold's verdict")
    p.set_defaults(run=cmd_diff)

    p = sub.add_parser("report", help="write a build's report.html again, with the benchmarks run since")
    p.add_argument("build", help="a build folder: OUT/<spec stem>, e.g. build/deit_tiny_x5")
    p.set_defaults(run=cmd_report)

    p = sub.add_parser("serve", help="serve one part of a decomposed bundle over gRPC (blocks; Ctrl-C stops)")
    p.add_argument("bundle", help="a bundle folder with a collab.json")
    p.add_argument("--part", type=int, required=True, metavar="K", help="the part to serve, from 0")
    p.add_argument("--port", type=int, required=True, metavar="P", help="the port to listen on (0: any free one)")
    p.add_argument("--host", default="127.0.0.1", metavar="H",
                   help="the address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--threads", type=int, metavar="T", help="threads the part's runtime uses (default: its own)")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("infer", help="classify images with a decomposed bundle's served parts")
    p.add_argument("bundle", help="a bundle folder with a collab.json (its fusion runs here)")
    p.add_argument("images", nargs="+", metavar="IMAGES",
                   help="image files (PNG, JPEG, ...) or .npy arrays (B, C, H, W) of preprocessed images")
    p.add_argument("--peers", metavar="HOST:PORT,...",
                   help="the served parts, in part order (default: the placement in collab.json, a target's peers)")
    p.add_argument("--deadline-ms", type=float, metavar="N",
                   help="how long to wait for the parts per call (default: collab.json's deadline_ms)")
    p.add_argument("--json", action="store_true", help="print the answers as JSON")
    p.set_defaults(run=cmd_infer)
    return top


def _terminate(signum, frame):
    from evc.atomic import stop

    stop()
    raise KeyboardInterrupt


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """evc's own warnings (an image skipped under skip_bad) read as the build's other warnings do."""
    from evc.model.data import SkippedImage

    if issubclass(category, SkippedImage):
        print(f"warning: {message}", file=sys.stderr)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def _quiet_libraries() -> None:
    """Keep libraries' notices to their own callers off the user's terminal: deprecations and future
    changes in torch, timm and transformers, and torch's pytree log of the enums torchao (imported by
    transformers) registers."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # clean up staged bundles as on Ctrl-C
    warnings.showwarning = _show_warning
    _quiet_libraries()
    try:
        return args.run(args)
    except EvcError as e:
        print(e.render(), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        from evc.atomic import remove_own

        remove_own()
        print("interrupted: no bundle was changed", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
