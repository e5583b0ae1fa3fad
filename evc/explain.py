"""`evc explain SPEC`: the recognised model, what the passes do to it, and the targets. Writes nothing."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from evc.cache import Cache
from evc.compress import compile_model
from evc.keys import canonical
from evc.plan import Plan
from evc.progress import Progress
from evc.registry import DEVICES, FORMATS, PASSES, Placement


def explain(plan: Plan, out: Path, console: Console | None = None) -> None:
    console = console or Console()
    compiled = compile_model(plan, Cache(out / ".cache"), Progress(), write_cache=False)
    structure = compiled.program.structure
    weights = "none (random init)" if plan.model.random_init else plan.model.weights or f"from {plan.model.source}"
    console.print(f"[bold]model[/] {plan.model.name} = {plan.model.source}, "
                  f"input {'x'.join(map(str, compiled.program.input.shape))}, weights {weights}")
    if compiled.program.parts:
        console.print(_decomposition(compiled.program), markup=False)
    elif structure is None:
        console.print(f"not recognised as a ViT, so it lowers but cannot be compressed: "
                      f"{compiled.program.unrecognised}")
    else:
        console.print(structure.describe())
    if compiled.budget:
        console.print(budget_text(plan, compiled.budget), highlight=False, markup=False)
    for p, found in zip(plan.passes, compiled.found):
        info = PASSES[p.name]
        params = ", ".join(f"{k} = {'(searched)' if k == 'keep' and v is None and plan.budget else v}"
                           for k, v in canonical(p.params).items())
        console.print(f"[bold]pass[/] {p.name} {{ {params} }}: {info.help}")
        for key, value in found.items():
            console.print(f"  found: {key} = {_spec_value(value)}", highlight=False)
    console.print(blocks_table(compiled.before, compiled.after))
    for t in plan.targets:
        params = ", ".join(f"{k} = {v}" for k, v in canonical(t.params).items())
        console.print(f"[bold]target[/] {t.name}: {DEVICES[t.device].help or t.device}, "
                      f"{FORMATS[t.format].help} ({params})")
        fmt = FORMATS[t.format].plugin
        if isinstance(fmt, Placement):
            console.print(placement_text(fmt.placement(compiled.program, t)))


def budget_text(plan: Plan, record: dict) -> str:
    """What a budget's search chose, and the fragment that pins it in the spec."""
    from evc.budget import fragment, human

    metric, reached, target = record["metric"], record["reached"], record["target"]
    how = f"pinned by {record['pinned']}" if record.get("pinned") else f"searched, {len(record['counts'])} count(s)"
    lines = [f"budget {metric} <= {human(target)}: reached {human(reached)} ({how})",
             "  chosen, to pin in the spec (or `evc build --pin` for a lock file):"]
    lines += [f"    {entry['pass']} {{ {fragment(entry)} }}" for entry in record["chosen"]]
    return "\n".join(lines)


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


def _decomposition(program) -> str:
    """A decomposed model: each part, what it was shrunk for and what it sends, then the fusion."""
    fusion = program.fusion
    lines = [f"decomposed into {len(program.parts)} parts (DeViT):"]
    for part in program.parts:
        lines.append(f"{part.name}: classes {list(part.classes)}, sends {part.width} floats per image")
        lines += [f"  {line}" for line in part.program.structure.describe().splitlines()]
    dropped = ", fitted with each part missing in turn too" if fusion.drop else ""
    lines.append(f"fusion: one Linear, {fusion.linear.in_features} in (the parts' features and a flag each), "
                 f"{fusion.linear.out_features} out{dropped}")
    return "\n".join(lines)
