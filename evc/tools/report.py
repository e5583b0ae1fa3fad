"""The report stage: a build folder → `report.html`, one page that opens from disk with no network.

    path = write_report(Path("build/deit_tiny_x5"))   # build/deit_tiny_x5/report.html
    text = render(Path("build/deit_tiny_x5"))

It reads what the build and the benchmarks left: each bundle's manifest.json
(per-block MACs and params before and after, by part; the structure; the
pruning groups, frozen ones with why; parity; accuracy; the budget's search),
an X5 bundle's op_check.json, and the figures benchmarks wrote into bundles
(`evc bench`'s results/evc_bench.json, an X5's results.json, a phone's
results/results.jsonl, a Jetson's results/results.json), and an Ethos-U bundle's
Vela estimate (its latency, and its operator placement from ethos_u.json).
Charts are Vega-Lite specs made with altair, drawn by vega-embed, whose
JavaScript vl-convert bundles and the page carries inline.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from evc.errors import InputError
from evc.ir.summary import frozen_by_reason, groups_counts
from evc.layout import BENCH_RESULTS, MANIFEST, read_manifest

REPORT = "report.html"
PARTS = ("attention", "mlp", "tokens")
PLACES = ("bpu", "npu", "xnnpack", "cpu", "portable", "folded", "unsupported")
KINDS = ["original", "compressed", "artifact"]


def write_report(build: Path) -> Path:
    """Render the report of `build` (OUT/<spec stem>) into build/report.html, whole or not at all."""
    from evc.atomic import write_text

    path = build / REPORT
    write_text(path, render(build), "write the build's report")
    return path


def is_current(build: Path) -> bool:
    """The report is newer than every manifest and benchmark result it reads."""
    path = build / REPORT
    if not path.is_file():
        return False
    read = [f for folder, _ in bundles(build, strict=False) for f in (folder / MANIFEST, *_result_files(folder))]
    return all(f.stat().st_mtime <= path.stat().st_mtime for f in read if f.is_file())


def bundles(build: Path, strict: bool = True) -> list[tuple[Path, dict]]:
    """Each bundle of the build (a folder with a manifest.json), by target name."""
    found = []
    if build.is_dir():
        for folder in sorted(p for p in build.iterdir() if p.is_dir() and not p.name.startswith(".")):
            manifest = read_manifest(folder)
            if manifest is not None and "failed" not in manifest:
                found.append((folder, manifest))
    if strict and not found:
        raise InputError(f"{build} holds no bundle (no <target>/manifest.json): give a build folder, "
                         "OUT/<spec stem>, that evc build wrote")
    return found


def render(build: Path) -> str:
    """The report page of `build`."""
    import jinja2

    found = bundles(build)
    first = found[0][1]  # every bundle holds the same compressed model; the targets differ
    charts, targets = [], []
    before, after = first["params_macs"]["before"], first["params_macs"]["after"]
    if before.get("blocks"):
        charts += [_chart("block-macs", "MACs per block", _block_costs(before, after, "macs")),
                   _chart("block-params", "params per block", _block_costs(before, after, "params")),
                   _chart("block-shapes", "heads, MLP units and tokens per block", _block_shapes(before, after))]
    for folder, manifest in found:
        target = _target(folder, manifest)
        targets.append(target)
        if target["latency"]:
            charts.append(_chart(f"latency-{target['name']}", f"{target['name']}: latency",
                                 _latency(target["latency"])))
        if target["placement"]:
            charts.append(_chart(f"placement-{target['name']}", f"{target['name']}: operator placement",
                                 _placement(target["placement"])))
    evaluation = first.get("evaluation")
    if evaluation:
        points = _accuracy_points(evaluation, targets)
        charts.append(_chart("accuracy-macs", "accuracy against MACs", _accuracy(points, "macs", evaluation)))
        timed = [p for p in points if p.get("latency_ms") is not None]
        if timed:
            charts.append(_chart("accuracy-latency", "accuracy against latency",
                                 _accuracy(timed, "latency_ms", evaluation)))
    budget = first.get("budget")
    if budget and budget.get("sensitivity"):
        charts.append(_chart("budget-sensitivity", "the budget's sensitivity", _sensitivity(budget)))
    environment = jinja2.Environment(loader=jinja2.PackageLoader("evc.tools", "templates"), autoescape=True,
                                     keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    environment.globals["zip"] = zip
    page = environment.get_template("report.html.j2")
    specs = _script_json([{"id": c["id"], "spec": c["spec"]} for c in charts])
    groups = first.get("groups")  # None in a manifest written before evc kept them, or where the analysis failed
    return page.render(title=build.name, first=first, targets=targets, charts={c["id"]: c for c in charts},
                       evaluation=evaluation, budget=budget, script=_vega_script(build.parent / ".cache"), specs=specs,
                       groups=groups and {"counts": groups_counts(groups), "frozen": frozen_by_reason(groups)})


# ---- what each target's bundle holds --------------------------------------------------------------

def _target(folder: Path, manifest: dict) -> dict:
    placement = None
    for artifact in manifest["artifacts"]:
        check = artifact.get("op_check")
        if check:
            report = folder / Path(artifact["path"]).parent / check["report"]
            nodes = json.loads(report.read_text())["nodes"] if report.is_file() else check["cpu"]
            s = check["summary"]
            placement = {"artifact": artifact["path"], "march": check["march"], "summary": s, "accelerator": "BPU",
                         "line": f"{s['bpu']} on the BPU, {s['cpu']} on the CPU, {s['unsupported']} unsupported, "
                                 f"{s['folded']} folded",
                         "nodes": nodes, "off": check["cpu"] + check["unsupported"]}
        if artifact.get("ethos_u"):
            placement = _npu_placement(folder, artifact["ethos_u"])
        if artifact.get("delegation") and artifact.get("placement"):
            placement = _delegated_placement(artifact)
    return {"name": manifest["target"]["name"], "folder": folder, "device": manifest["target"]["device"],
            "format": manifest["target"]["format"], "artifacts": manifest["artifacts"],
            "latency": latency_rows(folder, manifest), "placement": placement}


def _npu_placement(folder: Path, estimate: dict) -> dict:
    """Vela's placement of an Ethos-U bundle's model: operators by type on the NPU and the CPU (ethos_u.json), and
    each CPU operator with Vela's reasons."""
    summary = folder / estimate["summary"]
    by_op = json.loads(summary.read_text())["by_op"] if summary.is_file() else {}
    nodes = [{"op": op, "on": place} for op, places in by_op.items() for place, n in places.items() for _ in range(n)]
    return {"artifact": estimate["files"]["model"], "accelerator": "NPU",
            "march": f"{estimate['accelerator']}, {estimate['system']}, {estimate['memory_mode']}",
            "summary": estimate["ops"], "line": f"{estimate['ops']['npu']} on the NPU, {estimate['ops']['cpu']} on "
                                                 "the CPU",
            "nodes": nodes, "off": [{"node": op["output"], "op": op["op"], "on": "cpu", "why": "; ".join(op["reasons"])}
                                    for op in estimate["cpu_ops"]]}


def _delegated_placement(artifact: dict) -> dict:
    """ExecuTorch's delegation of a pte bundle's model: operators by type in XNNPACK's partitions and in the portable
    graph (the manifest's counts), and each portable node with the module it came from."""
    ops, check = artifact["delegation"]["ops"], artifact["placement"]
    places = {"delegated": "xnnpack", "portable": "portable"}
    nodes = [{"op": op, "on": places[where]} for op, counts in ops.items() for where, n in counts.items()
             for _ in range(n)]
    s = check["summary"]
    return {"artifact": artifact["path"], "accelerator": "XNNPACK", "march": check["march"], "summary": s,
            "line": f"{s['xnnpack']} operators in XNNPACK's partitions, {s['portable']} portable", "nodes": nodes,
            "off": check["cpu"]}


def estimate_line(estimate: dict) -> str:
    """Vela's estimate in one line, as `evc build` prints it under the artifact."""
    memory = ", ".join(f"{name} {size / 1024:.0f} KiB" for name, size in estimate["memory"].items())
    return (f"Vela, {estimate['accelerator']} ({estimate['system']}, {estimate['memory_mode']}): "
            f"{estimate['inference_ms']:.3f} ms, {estimate['ops']['npu']} ops on the NPU, {estimate['ops']['cpu']} on "
            f"the CPU; {memory}")


def _result_files(folder: Path) -> list[Path]:
    return [folder / BENCH_RESULTS, folder / "results.json", folder / "results" / "results.json",
            folder / "results" / "results.jsonl"]


def latency_rows(folder: Path, manifest: dict) -> list[dict]:
    """Every latency measured for the bundle: `evc bench` here, and what its bench script wrote on the device.
    Rows: artifact, threads, latency_ms, statistic (median or mean), where it was measured."""
    here, board, jetson, phone = _result_files(folder)
    first = manifest["artifacts"][0]
    rows = []
    estimate = first.get("ethos_u")
    if estimate:  # no board reached: Vela's estimate is the bundle's latency
        rows.append({"artifact": estimate["files"]["model"], "threads": None, "latency_ms": estimate["inference_ms"],
                     "statistic": "estimate", "where": f"Vela ({estimate['accelerator']}, {estimate['system']})"})
    if here.is_file():
        record = json.loads(here.read_text())
        rows += [{"artifact": r["artifact"], "threads": r["threads"], "latency_ms": r["median_ms"],
                  "statistic": "median", "where": f"here ({record['machine']['processor']})"}
                 for r in record["results"]]
    if board.is_file():  # the X5's bench.sh: parse_hrt.py --json over hrt_model_exec perf
        compiled = Path(first.get("toolchain", {}).get("output", first["path"])).name
        rows += [{"artifact": compiled, "threads": r.get("threads"), "latency_ms": r["latency_ms"],
                  "statistic": "mean", "where": "device (hrt_model_exec perf)"}
                 for r in json.loads(board.read_text())["results"]]
    if jetson.is_file():  # the Jetson's bench.sh: parse_trtexec.py
        latency = json.loads(jetson.read_text())["trtexec"]["latency_ms"]
        statistic = "median" if "median" in latency else "mean"
        rows.append({"artifact": first["path"], "threads": None, "latency_ms": latency[statistic],
                     "statistic": statistic, "where": "device (trtexec)"})
    if phone.is_file():  # a phone's benchmark_model, by bench.sh or evc bench --serial
        rows += [{"artifact": first["path"], "threads": r.get("threads"), "latency_ms": r["inference_avg_ms"],
                  "statistic": "mean", "where": "device (benchmark_model)"}
                 for r in map(json.loads, filter(str.strip, phone.read_text().splitlines()))]
    return rows


def _accuracy_points(evaluation: dict, targets: list[dict]) -> list[dict]:
    """The model as loaded and compressed (ONNX Runtime, one thread), and each artifact scored (its latency at
    the fewest threads measured, where it was)."""
    metric = f"top{evaluation['top'][0]}"
    points = [{"model": name, "kind": name, metric: evaluation[name][metric], "macs": evaluation[name]["macs"],
               "latency_ms": evaluation[name]["latency_ms"], "where": "here (ONNX Runtime, 1 thread)"}
              for name in ("original", "compressed")]
    for target in targets:
        for artifact in target["artifacts"]:
            if "accuracy" not in artifact:
                continue
            timed = sorted((r for r in target["latency"] if r["artifact"] == artifact["path"]),
                           key=lambda r: r["threads"] or 0)
            points.append({"model": f"{target['name']}: {artifact['path']}", "kind": "artifact",
                           metric: artifact["accuracy"][metric], "macs": evaluation["compressed"]["macs"],
                           "latency_ms": timed[0]["latency_ms"] if timed else None,
                           "where": timed[0]["where"] if timed else None})
    return points


# ---- charts ---------------------------------------------------------------------------------------

def _chart(name: str, title: str, chart) -> dict:
    return {"id": f"chart-{name}", "title": title, "spec": chart.to_dict()}


def _block_costs(before: dict, after: dict, measure: str):
    """One bar per block, before and after side by side, stacked by part."""
    import altair as alt

    rows = []
    for when, summary in (("before", before), ("after", after)):
        for block in summary["blocks"]:
            parts = block.get("parts") or {}  # a summary cached before evc counted parts, or a removed block
            for part in PARTS:
                value = parts[part][measure] if parts else (block[measure] if part == "attention" else 0)
                rows.append({"block": block["index"], "when": when, "part": part, measure: value})
    return alt.Chart(alt.Data(values=rows)).mark_bar().encode(
        x=alt.X("block:O", title="block"), xOffset=alt.XOffset("when:N", sort=["before", "after"]),
        y=alt.Y(f"sum({measure}):Q", title=measure), color=alt.Color("part:N", sort=list(PARTS)),
        opacity=alt.Opacity("when:N", sort=["before", "after"], scale=alt.Scale(range=[0.45, 1.0])),
        tooltip=["block:O", "when:N", "part:N", f"{measure}:Q"]).properties(width=alt.Step(14), height=220)


def _block_shapes(before: dict, after: dict):
    """Heads, MLP units and tokens of each block as the passes left them; ticks mark the model as loaded."""
    import altair as alt

    names = {"heads": "heads", "hidden": "MLP units", "tokens": "tokens"}
    rows = [{"block": a["index"], "what": names[key], "after": a[key], "before": b[key]}
            for key in names for b, a in zip(before["blocks"], after["blocks"])]
    base = alt.Chart(alt.Data(values=rows))
    bars = base.mark_bar().encode(x=alt.X("block:O"), y=alt.Y("after:Q", title=None),
                                  tooltip=["block:O", "what:N", "before:Q", "after:Q"])
    ticks = base.mark_tick(color="black", thickness=2).encode(x="block:O", y="before:Q")
    return alt.layer(bars, ticks).properties(width=alt.Step(16), height=120).facet(
        column=alt.Column("what:N", title=None, sort=list(names.values()))).resolve_scale(y="independent")


def _latency(rows: list[dict]):
    import altair as alt

    shown = [{**r, "threads": "-" if r["threads"] is None else str(r["threads"])} for r in rows]
    return alt.Chart(alt.Data(values=shown)).mark_bar().encode(
        y=alt.Y("artifact:N", title=None), yOffset="threads:N", x=alt.X("latency_ms:Q", title="ms"),
        color=alt.Color("threads:N"), tooltip=["artifact:N", "threads:N", "latency_ms:Q", "statistic:N", "where:N"],
    ).properties(width=420)


def _placement(placement: dict):
    """Nodes per operator type, stacked by where the device's operator table puts them."""
    import altair as alt

    counts: dict[tuple[str, str], int] = {}
    for node in placement["nodes"]:
        counts[node["op"], node["on"]] = counts.get((node["op"], node["on"]), 0) + 1
    rows = [{"op": op, "on": on, "nodes": n} for (op, on), n in sorted(counts.items())]
    return alt.Chart(alt.Data(values=rows)).mark_bar().encode(
        y=alt.Y("op:N", sort="-x", title=None), x=alt.X("sum(nodes):Q", title="nodes"),
        color=alt.Color("on:N", sort=list(PLACES), scale=alt.Scale(domain=list(PLACES))),
        tooltip=["op:N", "on:N", "nodes:Q"]).properties(width=420)


def _accuracy(points: list[dict], axis: str, evaluation: dict):
    import altair as alt

    metric = f"top{evaluation['top'][0]}"
    title = {"macs": "MACs", "latency_ms": "latency (ms)"}[axis]
    return alt.Chart(alt.Data(values=points)).mark_point(size=90, filled=True).encode(
        x=alt.X(f"{axis}:Q", title=title, scale=alt.Scale(zero=False)),
        y=alt.Y(f"{metric}:Q", title=f"top-{evaluation['top'][0]} on '{evaluation['data']}'",
                axis=alt.Axis(format="%")),
        color=alt.Color("kind:N", sort=KINDS), shape=alt.Shape("kind:N", sort=KINDS),
        tooltip=["model:N", f"{metric}:Q", f"{axis}:Q", "where:N"]).properties(width=360, height=240)


def _sensitivity(budget: dict):
    """Each searched block's divergence as its heads or units go: what the search spent."""
    import altair as alt

    rows = [{"pass": g["pass"], "block": g["block"], "width": int(w), "divergence": d}
            for g in budget["sensitivity"] for w, d in g["divergence"].items()]
    return alt.Chart(alt.Data(values=rows)).mark_line(point=True).encode(
        x=alt.X("width:Q", title="heads or units kept"), y=alt.Y("divergence:Q", title="KL divergence"),
        color="block:N", tooltip=["pass:N", "block:N", "width:Q", "divergence:Q"],
    ).properties(width=300, height=200).facet(column=alt.Column("pass:N", title=None)).resolve_scale(
        x="independent")


# ---- the page's scripts ---------------------------------------------------------------------------

def _vega_script(cache_root: Path) -> str:
    """vega, vega-lite and vega-embed in one script, for the Vega-Lite version this altair writes; bundled once
    per version (1.4 s) and kept in the build cache."""
    import vl_convert
    from altair.utils._importers import vl_version_for_vl_convert

    from evc.cache import Cache

    cache, version = Cache(cache_root), vl_version_for_vl_convert()
    key = f"vl-convert-{vl_convert.__version__}-vega-lite-{version}"
    hit = cache.get("report", key)
    if hit is None:
        script = re.sub("</(script)", r"<\\/\1", vl_convert.javascript_bundle(vl_version=version), flags=re.IGNORECASE)
        with cache.entry("report", key) as folder:
            (folder / "vega.js").write_text(script)
        hit = cache.path("report", key)
    return (hit / "vega.js").read_text()


def _script_json(value) -> str:
    """JSON safe inside <script>: no `</` can close the element early."""
    return json.dumps(value).replace("</", "<\\/")
