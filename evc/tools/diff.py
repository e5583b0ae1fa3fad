"""`evc diff OLD NEW`: what changed between two builds, per target, and whether it crosses a threshold.

    old, new = bundles(Path("main/build/deit")), bundles(Path("build/deit"))
    report = compare(old, new, [threshold("latency+5%"), threshold("top1-0.5")])
    report["failed"]                      # True when a threshold was crossed

OLD and NEW are each a manifest.json, a bundle folder, or a build folder
holding bundles (`OUT/<spec stem>/`, or `OUT/` with several specs); bundles
are matched by target name. Each target's figures come from its manifest
(and `bench.json` beside it, what `evc bench --json` printed, when present,
else results/evc_bench.json, what the last `evc bench` of the bundle saved):

    macs, params     the compressed model's totals (params_macs.after.total)
    size             the artifacts' bytes, summed
    latency          ms: bench.json's (or evc_bench.json's) first row, else Vela's estimate (an
                     Ethos-U bundle), else the evaluate block's ONNX Runtime median
    cpu_ops          an Ethos-U bundle's operators Vela left to the CPU
    sram             an Ethos-U bundle's peak SRAM bytes, as Vela estimates them
    top1, top5, ...  the compressed model's accuracy with an evaluate block, in percentage points
    cosine           the worst parity cosine of the artifacts
    max_abs_diff     the largest parity max abs difference of the artifacts
    agreement        the worst parity top-1 agreement of the artifacts, in percentage points (none
                     where every output is a map: segmentation, depth, features)

A threshold `METRIC+N` fails when NEW exceeds OLD by more than N (in the
metric's unit), `METRIC-N` when NEW falls short of OLD by more than N; with
`%`, N is relative to OLD: `latency+5%`, `top1-0.5`, `macs+0%`, `size+10%`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from evc.errors import InputError
from evc.layout import BENCH_RESULTS, MANIFEST

BENCH = "bench.json"
# and top1, top5, ...
METRICS = ("macs", "params", "size", "latency", "cosine", "max_abs_diff", "agreement", "cpu_ops", "sram")
_THRESHOLD = re.compile(r"^\s*([a-z_0-9]+)\s*([+-])\s*(\d+(?:\.\d*)?|\.\d+)\s*(%?)\s*$")


@dataclass(frozen=True)
class Threshold:
    """`latency+5%`: fail when the new latency is more than 5% above the old."""

    text: str
    metric: str
    sign: int  # +1: an increase beyond `amount` fails; -1: a decrease
    amount: float
    relative: bool

    def limit(self, old: float) -> float:
        step = abs(old) * self.amount / 100 if self.relative else self.amount
        return old + self.sign * step

    def crossed(self, old: float, new: float) -> bool:
        limit = self.limit(old)
        return new > limit if self.sign > 0 else new < limit


def threshold(text: str) -> Threshold:
    """Parse one --fail-on expression; InputError (exit 2) naming it when it is malformed."""
    match = _THRESHOLD.match(text)
    if match is None:
        raise InputError(f"--fail-on {text!r}: expected METRIC+N or METRIC-N, N a number, optionally with %, "
                         "as in latency+5%, top1-0.5, macs+0%")
    metric, sign, amount, percent = match.groups()
    if metric not in METRICS and not re.fullmatch(r"top\d+", metric):
        known = ", ".join([*METRICS, "top1", "top5"])
        raise InputError(f"--fail-on {text!r}: unknown metric '{metric}' (known: {known})")
    return Threshold(text.strip(), metric, 1 if sign == "+" else -1, float(amount), percent == "%")


def bundles(path: Path) -> dict[str, Path]:
    """Each bundle's manifest under `path`, by target name (by `stem/target` when `path` holds several specs)."""
    if path.is_file():
        return {_manifest(path)["target"]["name"]: path}
    if (path / MANIFEST).is_file():
        return {_manifest(path / MANIFEST)["target"]["name"]: path / MANIFEST}
    if not path.is_dir():
        raise InputError(f"{path}: no such manifest or build folder")
    for pattern in ("*/" + MANIFEST, "*/*/" + MANIFEST):
        found = sorted(p for p in path.glob(pattern) if not _hidden(p.relative_to(path)))
        if found:
            deep = pattern.count("/") == 2
            return {(f"{p.parent.parent.name}/" if deep else "") + _manifest(p)["target"]["name"]: p for p in found}
    raise InputError(f"{path}: no bundle in it (no {MANIFEST} in it, its folders or theirs)")


def _hidden(relative: Path) -> bool:
    """The cache (`.cache`), staged bundles and failed ones (`cpu.failed`) are not bundles of the build."""
    return any(part.startswith(".") or part.endswith(".failed") for part in relative.parts)


def _manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except OSError as e:
        raise InputError(f"{path}: cannot read it: {e.strerror or e}") from None
    except ValueError as e:
        raise InputError(f"{path}: not JSON: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("target"), dict) \
            or "name" not in manifest["target"]:
        raise InputError(f"{path}: not an evc manifest: it has no key 'target.name'")
    return manifest


def figures(path: Path) -> dict[str, float]:
    """A bundle's figures, by metric name, from its manifest (and bench.json beside it)."""
    manifest = _manifest(path)
    out: dict[str, float] = {}
    try:
        total = manifest["params_macs"]["after"]["total"]
        out["macs"], out["params"] = total["macs"], total["params"]
        artifacts = manifest["artifacts"]
        out["size"] = sum(a["size"] for a in artifacts)
    except (KeyError, TypeError) as e:
        raise InputError(f"{path}: not an evc manifest: it has no key {e}") from None
    parities = [a["parity"] for a in artifacts if isinstance(a.get("parity"), dict)]
    if parities:
        out["cosine"] = min(p["cosine"] for p in parities)
        out["max_abs_diff"] = max(p["max_abs_diff"] for p in parities)
        agreements = [p["top1_agreement"] for p in parities if p.get("top1_agreement") is not None]
        if agreements:  # a map's output has no top-1
            out["agreement"] = 100 * min(agreements)
    compressed = (manifest.get("evaluation") or {}).get("compressed") or {}
    for key, value in compressed.items():
        if re.fullmatch(r"top\d+", key):
            out[key] = 100 * value
    estimate = next((a["ethos_u"] for a in artifacts if isinstance(a.get("ethos_u"), dict)), None)
    if estimate is not None:
        out["cpu_ops"] = estimate["ops"]["cpu"]
        out["sram"] = estimate["memory"].get("Sram", 0)
    latency = _bench_latency(path.parent / BENCH)
    if latency is None:
        latency = _saved_latency(path.parent / BENCH_RESULTS)
    if latency is None and estimate is not None:
        latency = estimate["inference_ms"]
    if latency is None:
        latency = compressed.get("latency_ms")
    if latency is not None:
        out["latency"] = latency
    return out


def _bench_latency(path: Path) -> float | None:
    """The first row's median ms of `evc bench --json` saved beside the manifest (a phone's average)."""
    if not path.is_file():
        return None
    try:
        row = json.loads(path.read_text())["rows"][0]
        return row["median_ms"] if "median_ms" in row else row["inference_avg_ms"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise InputError(f"{path}: not what `evc bench --json` prints: {type(e).__name__} {e}") from None


def _saved_latency(path: Path) -> float | None:
    """The first row's median ms that the last `evc bench` here saved in the bundle."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["results"][0]["median_ms"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise InputError(f"{path}: not what `evc bench` saves: {type(e).__name__} {e}") from None


def compare(old: dict[str, Path], new: dict[str, Path], thresholds: list[Threshold]) -> dict:
    """What `evc diff --json` prints (docs/json.md): each target's figures old and new, and each threshold's
    verdict per target. A threshold on a figure one of the two lacks is an InputError naming the file."""
    single = len(old) == 1 and len(new) == 1  # two manifests compare whatever their target names
    pairs = [(next(iter(old)), next(iter(new)))] if single else \
        [(name, name) for name in old if name in new]
    targets, verdicts = [], []
    for old_name, new_name in pairs:
        before, after = figures(old[old_name]), figures(new[new_name])
        rows = {m: _change(before.get(m), after.get(m)) for m in dict.fromkeys([*before, *after])}
        targets.append({"target": new_name, "old": str(old[old_name]), "new": str(new[new_name]),
                        "status": "same" if before == after else "changed", "metrics": rows})
        for t in thresholds:
            for side, values, path in (("old", before, old[old_name]), ("new", after, new[new_name])):
                if t.metric not in values:
                    raise InputError(f"--fail-on {t.text}: {path} has no {t.metric} ({_source(t.metric)})")
            crossed = t.crossed(before[t.metric], after[t.metric])
            verdicts.append({"threshold": t.text, "target": new_name, "metric": t.metric,
                             "old": before[t.metric], "new": after[t.metric], "limit": t.limit(before[t.metric]),
                             "crossed": crossed})
    if not single:
        targets += [{"target": n, "old": str(old[n]), "new": None, "status": "removed", "metrics": {}}
                    for n in old if n not in new]
        targets += [{"target": n, "old": None, "new": str(new[n]), "status": "added", "metrics": {}}
                    for n in new if n not in old]
    return {"schema": "evc.diff/1", "targets": targets, "thresholds": verdicts,
            "failed": any(v["crossed"] for v in verdicts)}


def _source(metric: str) -> str:
    if metric == "latency":
        return f"neither {BENCH} beside it (evc bench BUNDLE --json > BUNDLE/{BENCH}) nor evaluation.compressed" \
               ".latency_ms (an evaluate block)"
    if metric.startswith("top"):
        return f"key 'evaluation.compressed.{metric}': the spec needs an evaluate block with {metric[3:]} in top"
    if metric in ("cpu_ops", "sram"):
        return "no Vela estimate: not an Ethos-U bundle (device = ethos_u)"
    if metric == "agreement":
        return "no artifact's parity has a top-1 agreement: none was checked, or each output is a map"
    return "no artifact with key 'parity' in its manifest"


def _change(old: float | None, new: float | None) -> dict:
    row = {"old": old, "new": new}
    if old is not None and new is not None:
        row["delta"] = new - old
        row["relative"] = (new - old) / abs(old) if old else None
    return row


def text(report: dict) -> str:
    """The report for people: per target, each figure old → new with its change, then each crossed threshold."""
    lines = []
    for t in report["targets"]:
        if t["status"] in ("added", "removed"):
            lines.append(f"target {t['target']}: {t['status']} ({t['new'] or t['old']})")
            continue
        lines.append(f"target {t['target']}: {'no change' if t['status'] == 'same' else 'changed'}")
        for metric, row in t["metrics"].items():
            lines.append(f"  {metric:<13} {_shown(metric, row['old']):>14} → {_shown(metric, row['new']):<14}"
                         f"{_delta(row)}")
    for v in report["thresholds"]:
        verdict = "CROSSED" if v["crossed"] else "ok"
        lines.append(f"{verdict}: {v['threshold']} on target {v['target']}: {_shown(v['metric'], v['old'])} → "
                     f"{_shown(v['metric'], v['new'])} (limit {_shown(v['metric'], v['limit'])})")
    return "\n".join(lines)


def _shown(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    if metric in ("macs", "params"):
        return f"{value / 1e6:.3f} M"
    if metric == "size":
        return f"{value / 1e6:.3f} MB"
    if metric == "sram":
        return f"{value / 1024:.1f} KiB"
    if metric == "cpu_ops":
        return f"{value:.0f}"
    if metric == "latency":
        return f"{value:.3f} ms"
    if metric.startswith("top") or metric == "agreement":
        return f"{value:.2f}%"
    return f"{value:.6g}"


def _delta(row: dict) -> str:
    if "delta" not in row or row["delta"] == 0:
        return ""
    relative = f" ({row['relative']:+.1%})" if row.get("relative") is not None else ""
    return f" {row['delta']:+.6g}{relative}"
