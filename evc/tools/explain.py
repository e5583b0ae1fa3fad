"""`evc explain SPEC`: the model as loaded, the passes as the spec writes them, each block before → after,
and the targets. Writes nothing.

    record = explain(plan, Path("build"))       # prints it; the record is what `--json` prints

When the build cache under OUT already holds the compressed program (a build
ran), everything is read from it without importing torch or running a pass;
an X5 target's operator check comes from the cached lowering. Otherwise the
model is loaded and the passes run, and nothing is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from evc.cache import Cache
from evc.ir.summary import groups_text
from evc.keys import Keys, canonical, derive
from evc.progress import Progress
from evc.registry import DEVICES, FORMATS, PASSES, Placement
from evc.spec.plan import Plan, TargetPlan


def explain(plan: Plan, out: Path, console: Console | None = None, as_json: bool = False) -> dict:
    """Print what the spec does to its model (one JSON document with `as_json`); return the record."""
    console = console or Console()
    record = explain_record(plan, out)
    if record["cached"]:
        print("explained from the build cache: the model was not loaded and no pass ran", file=sys.stderr)
    if as_json:
        print(json.dumps(record, indent=1))
    else:
        show(plan, record, console)
    return record


def explain_record(plan: Plan, out: Path) -> dict:
    """What `evc explain --json` prints (docs/json.md), from the build cache when it holds the program."""
    from evc.ir.capture import cached_summary

    keys, cache = derive(plan), Cache(out / ".cache")
    summary = cached_summary(cache, keys.program)
    placements = {t.name: _cached_placement(cache, keys, t) for t in plan.targets
                  if isinstance(FORMATS[t.format].plugin, Placement)}
    cached = summary is not None and summary.get("loaded") is not None and None not in placements.values()
    if not cached:
        summary, placements = _compiled(plan, cache, keys, placements)
    loaded = summary["loaded"]
    before, after = summary["before"], summary["after"]
    return {
        "schema": "evc.explain/1", "spec": str(plan.path), "cached": cached,
        "model": {"name": plan.model.name, "source": str(plan.model.source), "weights": _weights(plan),
                  "input": loaded["input"], "structure": loaded["structure"], "unrecognised": loaded["unrecognised"],
                  "describe": loaded["describe"], "groups": loaded.get("groups")},
        "compressed": summary["view"],
        "passes": [{"name": p.name,
                    **_as_written(plan, p.params, p.spans, searched=plan.budget is not None, name=p.name),
                    "found": found} for p, found in zip(plan.passes, summary["found"])],
        "budget": summary["budget"],
        "blocks": [{"index": b["index"], **{k: [b[k], a[k]] for k in ("tokens", "heads", "hidden", "params", "macs")}}
                   for b, a in zip(before["blocks"], after["blocks"])],
        "before": before, "after": after,
        "targets": [{"name": t.name, "device": t.device, "format": t.format,
                     **_as_written(plan, t.params, t.spans, skip=("device", "format")),
                     "placement": placements.get(t.name)} for t in plan.targets],
    }


def _compiled(plan: Plan, cache: Cache, keys: Keys, placements: dict) -> tuple[dict, dict]:
    """The summary and placements by loading the model and running the passes (or loading the cached program)."""
    from evc.driver import Stages
    from evc.ir.summary import program_view

    stages = Stages(plan, cache, Progress(), write_cache=False, keys=keys)
    compiled = stages.compiled
    as_loaded = compiled.loaded
    if as_loaded is None:  # a cache entry written before views were kept
        as_loaded = program_view(stages.original)
    summary = {"before": compiled.before, "after": compiled.after, "found": compiled.found,
               "budget": compiled.budget, "loaded": as_loaded,
               "view": compiled.view or program_view(compiled.program)}
    for t in plan.targets:
        if t.name in placements and placements[t.name] is None:
            placements[t.name] = FORMATS[t.format].plugin.placement(compiled.program, t)
    return summary, placements


def _cached_placement(cache: Cache, keys: Keys, target: TargetPlan) -> dict | None:
    """The operator check (an Ethos-U target's: Vela's placement) a build of this target kept with its cached
    artifacts, or None."""
    from evc.targets.lower import CHECKED

    hit = cache.get("lower", keys.lower[target.name])
    if hit is None:
        return None
    checked = json.loads((hit / CHECKED).read_text())
    return next((a.get("op_check") or a["placement"] for a in checked["artifacts"]
                 if "op_check" in a or "placement" in a), None)


def _weights(plan: Plan) -> str:
    if plan.model.random_init:
        return "none (random init)"
    return str(plan.model.weights) if plan.model.weights else f"from {plan.model.source}"


def _as_written(plan: Plan, params: dict, spans: dict, skip=(), searched: bool = False, name: str = "") -> dict:
    """A block's keys as the spec's text writes them, and the defaults of those it leaves out."""
    written = {k: _source_text(plan.text, spans[k]) for k in params if k in spans and k not in skip}
    defaults = {k: _spec_value(v) for k, v in canonical(params).items()
                if k not in spans and k not in skip and v is not None and v != []}
    if searched and PASSES[name].searched(params):
        written[PASSES[name].knob.keys[0]] = "(searched by the budget)"
    return {"written": written, "defaults": defaults}


def _source_text(text: str, span) -> str:
    """The spec's own text of a span, a value spread over lines joined into one."""
    lines = text.splitlines()[span.line - 1:span.end_line]
    if len(lines) == 1:
        return lines[0][span.col - 1:span.end_col - 1]
    lines[0], lines[-1] = lines[0][span.col - 1:], lines[-1][:span.end_col - 1]
    return " ".join(line.strip() for line in lines)


def show(plan: Plan, record: dict, console: Console) -> None:
    """The record for people: as loaded, the passes as written, before → after, the targets."""
    model = record["model"]
    console.print(f"[bold]model[/] {model['name']} = {model['source']}, input {'x'.join(map(str, model['input']))}, "
                  f"weights {model['weights']}", highlight=False)
    if model["structure"] is None:
        console.print("not recognised as a ViT: head_prune, ffn_prune and block_skip cut what its graph's pruning "
                      f"groups allow, token passes, decompose and budgets refuse it: {model['unrecognised']}",
                      markup=False, highlight=False)
    else:
        console.print("[bold]as loaded:[/]")
        console.print(model["describe"], markup=False, highlight=False)
    for line in groups_text(model):
        console.print(line, markup=False, highlight=False)
    if record["budget"]:
        console.print(budget_text(plan, record["budget"]), highlight=False, markup=False)
    for p in record["passes"]:
        console.print(f"[bold]pass[/] {p['name']} {{ {_entries(p['written'])} }}: {PASSES[p['name']].help}",
                      highlight=False)
        if p["defaults"]:
            console.print(f"  defaults: {_entries(p['defaults'])}", markup=False, highlight=False)
        for key, value in p["found"].items():
            console.print(f"  found: {key} = {_spec_value(value)}", markup=False, highlight=False)
    if record["compressed"] and record["compressed"].get("parts"):
        console.print(_decomposition(record["compressed"]), markup=False, highlight=False)
    console.print(blocks_table(record["before"], record["after"]))
    for t in record["targets"]:
        given = ", ".join(filter(None, [_entries(t["written"]), _entries(t["defaults"]) and
                                        f"defaults: {_entries(t['defaults'])}"]))
        console.print(f"[bold]target[/] {escape(t['name'])}: {escape(DEVICES[t['device']].help or t['device'])}, "
                      f"{escape(FORMATS[t['format']].help)} ({escape(given)})", highlight=False)
        if t["placement"] is not None:
            console.print(placement_text(t["placement"]), markup=False, highlight=False)


def _entries(values: dict) -> str:
    return ", ".join(f"{k} = {v}" for k, v in values.items())


def budget_text(plan: Plan, record: dict) -> str:
    """What a budget's search chose, and the fragment that pins it in the spec."""
    from evc.passes.budget import fragment, human

    metric, reached, target = record["metric"], record["reached"], record["target"]
    how = f"pinned by {record['pinned']}" if record.get("pinned") else f"searched, {len(record['counts'])} count(s)"
    lines = [f"budget {metric} <= {human(target)}: reached {human(reached)} ({how})",
             "  chosen, to pin in the spec (or `evc build --pin` for a lock file):"]
    lines += [f"    {entry['pass']} {{ {fragment(entry)} }}" for entry in record["chosen"]]
    judge = record.get("judge") or {"by": "divergence"}
    if judge["by"] == "recovery":
        lines += judged_text(judge, human)
    return "\n".join(lines)


def judged_text(judge: dict, human) -> list[str]:
    """Each candidate's estimate after its short recovery, round by round, its lead over uniform ratios, and why
    the winner was chosen, with the numbers."""
    by_loss = judge.get("measure") == "loss"
    rounds = [*judge.get("earlier_rounds", []), judge]
    lines = [f"  judged after {rounds[0]['steps']} steps of {judge['pass']}'s recipe (lr {judge['lr']:.3g}), on "
             f"{judge['images']} {judge['on']}; ranked by {'loss' if by_loss else 'images right, then loss'}, and "
             f"chosen over uniform ratios only by a lead of more than {rounds[0].get('bar', 1):.2f} standard errors:"]
    for earlier, later in zip(rounds, rounds[1:]):
        lines += _candidate_lines(earlier, human, by_loss)
        lines.append(f"  then {earlier['baseline']}, the best alike in every block, and its neighbours, each after "
                     f"{later['steps']} steps (bar {later['bar']:.2f}):")
    lines += _candidate_lines(judge, human, by_loss)
    named = {c["name"]: c for c in judge["candidates"]}
    baseline, winner = named[judge.get("baseline", "uniform")], named[judge["winner"]]
    flat = "uniform ratios" + (f" ({baseline['name']})" if baseline["name"] != "uniform" else "")
    if winner is baseline:
        rivals = [c for c in judge["candidates"] if c is not baseline and c.get("lead") is not None]
        nearest = max(rivals, key=lambda c: c["lead"], default=None)
        if nearest is None:
            why = ""
        elif nearest["lead"] > 0:
            why = f"; the nearest, {nearest['name']}, led by {_lead(nearest, by_loss)}"
        else:
            why = f"; none led them at all: the nearest, {nearest['name']}, was {_lead(nearest, by_loss)}"
        lines.append(f"  {flat} kept: no other allocation led them by more than {judge.get('bar', 1):.2f} standard "
                     f"errors{why}")
    else:
        measure = (f"loss {winner['loss']:.4f} against {baseline['loss']:.4f}" if by_loss else
                   f"top-1 {winner['top1']:.2%} against {baseline['top1']:.2%}")
        lines.append(f"  {winner['name']} beat {flat} after the same recovery: {measure}, a lead of "
                     f"{_lead(winner, by_loss)}")
    return lines


def _candidate_lines(round_: dict, human, by_loss: bool) -> list[str]:
    """One line per candidate of a round of judging, its winner marked."""
    width = max(len(c["name"]) for c in round_["candidates"])
    lines = []
    for c in round_["candidates"]:
        top1 = f"  top-1 {c['top1']:.2%}" if c["top1"] is not None else ""
        loss = f"loss {c['loss']:.4f}" if c["loss"] is not None else "not judged (time)"
        lead = f"  lead {_lead(c, by_loss)}" if c.get("lead") is not None else ""
        mark = "→" if c["name"] == round_["winner"] else " "
        lines.append(f"   {mark} {c['name']:<{width}}  {human(c['count']):>8}  {loss}{top1}{lead}")
    return lines


def _lead(candidate: dict, by_loss: bool) -> str:
    """A candidate's lead over the baseline and its standard error: in points of top-1, or of loss."""
    scale, unit = (1, "") if by_loss else (100, " points")
    return f"{scale * candidate['lead']:+.2f}{unit} (standard error {scale * candidate['se']:.2f})"


def _spec_value(value) -> str:
    """A value as the spec writes it, ready to paste."""
    if isinstance(value, list):
        return "[" + ", ".join(_spec_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_spec_value(v)}" for k, v in value.items() if v is not None) + " }"
    return f"{value:g}" if isinstance(value, float) else str(value)


def placement_text(check: dict) -> str:
    """Where each node of the lowered model runs on the device: counts, then every node off its accelerator."""
    counts = ", ".join(f"{n} {where}" for where, n in check["summary"].items() if n)
    lines = [f"  operator check ({check['march']}): {counts}"]
    for node in check["cpu"] + check["unsupported"]:
        lines.append(f"    {node['node']} ({node['op']}): {node['on']}, {node['why']}")
    return "\n".join(lines)


def _arrow(before, after, fmt=str) -> str:
    if before == after:
        return fmt(before)
    return f"{fmt(before)} → {fmt(after)}"


def _millions(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} M"


def _skipped(before: dict, after: dict) -> str:
    attn = before["heads"] and not after["heads"]
    mlp = before["hidden"] and not after["hidden"]
    return "block" if attn and mlp else "attn" if attn else "mlp" if mlp else ""


def blocks_table(before: dict, after: dict) -> Table:
    """Per block: tokens, heads, hidden width, params and MACs, before → after."""
    table = Table(title="params and MACs per block (before → after)")
    for column in ("block", "tokens", "heads", "hidden", "skipped", "params", "MACs"):
        table.add_column(column, justify="right")
    for part in ("stem", "blocks", "head", "total"):
        if part != "blocks":
            b, a = before[part], after[part]
            table.add_row(part, "", "", "", "", _arrow(b["params"], a["params"], _millions),
                          _arrow(b["macs"], a["macs"], _millions), style="bold" if part == "total" else None)
            continue
        for b, a in zip(before["blocks"], after["blocks"]):
            table.add_row(str(b["index"]), _arrow(b["tokens"], a["tokens"]), _arrow(b["heads"], a["heads"]),
                          _arrow(b["hidden"], a["hidden"]), _skipped(b, a),
                          _arrow(b["params"], a["params"], _millions), _arrow(b["macs"], a["macs"], _millions))
    return table


def _decomposition(view: dict) -> str:
    """A decomposed model: each part, what it was shrunk for and what it sends, then the fusion."""
    fusion = view["fusion"]
    lines = [f"decomposed into {len(view['parts'])} parts (DeViT):"]
    for part in view["parts"]:
        lines.append(f"{part['name']}: classes {part['classes']}, sends {part['width']} floats per image")
        lines += [f"  {line}" for line in part["describe"].splitlines()]
    dropped = ", fitted with each part missing in turn too" if fusion["drop"] else ""
    lines.append(f"fusion: one Linear, {fusion['in']} in (the parts' features and a flag each), "
                 f"{fusion['out']} out{dropped}")
    return "\n".join(lines)
