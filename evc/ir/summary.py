"""What a Program costs and shows, as JSON: params and MACs per block, and the view `evc explain` prints.

    summary(program)                    # {"stem", "blocks", "head", "total"}: params and MACs
    aligned_summary(program, original)  # the same in the original model's block order
    program_view(program)               # input, structure, parts, groups: what explain shows without loading it
    groups_text(view)                   # its pruning groups in words, without torch
    frozen_by_reason(view["groups"])    # its frozen groups, one row per reason
"""

from __future__ import annotations

import re

from evc.keys import canonical


def summary(program) -> dict:
    """Params and MACs of the stem, each block and the head of `program`, and their totals."""
    from evc.ir.macs import summarize

    return canonical(summarize(program.graph, program.structure, program.example()).to_dict())


def program_view(program) -> dict:
    """What `evc explain` shows of a program, as JSON, so that a cached one is shown without loading it:
    its input, its structure (the manifest's record, and in words) or why it was not recognised, its pruning
    groups (`groups_record`), and a decomposed model's parts and fusion."""
    view = {"input": list(program.input.shape), "structure": None, "describe": None,
            "unrecognised": program.unrecognised, "groups": _groups(program)}
    if program.structure is not None:
        view.update(structure=canonical(structure_record(program.structure)),
                    describe=program.structure.describe(), unrecognised=None)
    if program.parts:
        view["parts"] = [{"name": p.name, "classes": list(p.classes), "width": p.width,
                          "describe": p.program.structure.describe()} for p in program.parts]
        linear = program.fusion.linear
        view["fusion"] = {"in": linear.in_features, "out": linear.out_features, "drop": bool(program.fusion.drop)}
    return view


def _groups(program) -> dict | None:
    """The program's pruning groups as `groups_record` keeps them, or None where the analysis fails: they
    only inform, so they never break a build or explain. None for a decomposed program too: its parts were
    cut as the one model they split from, whose view has them."""
    if program.parts:
        return None
    try:
        from evc.ir.groups import channel_groups

        return groups_record(channel_groups(program.graph))
    except Exception:
        return None


def groups_record(groups) -> dict:
    """Pruning groups (evc.ir.groups.Group) as JSON: how many of each kind and their channels, the streams'
    widths, and each frozen group with a few of its parameters and what froze it."""
    def of_kind(kind: str, unit: str) -> dict:
        widths = [g.width for g in groups if g.kind == kind]
        return {"groups": len(widths), unit: sum(widths)}

    return {"heads": of_kind("heads", "heads"), "units": of_kind("units", "units"),
            "head_dim": of_kind("head_dim", "channels"), "streams": [g.width for g in groups if g.kind == "stream"],
            "frozen": [{"width": g.width, "members": list(dict.fromkeys(m.name for m in g.members))[:3],
                        "reason": g.reason} for g in groups if g.kind == "frozen"]}


def frozen_by_reason(record: dict) -> list[dict]:
    """The frozen groups of a `groups_record`, one row per reason, in order of first appearance: a reason that
    repeats per block (node 'unbind', 'unbind_1', ...) is one row, with its first node, members and `count`."""
    rows: dict[str, dict] = {}
    for group in record["frozen"]:
        key = re.sub(r"'([^']*?)_\d+'", r"'\1'", group["reason"])  # a block's copy of a node: name_<n>
        row = rows.setdefault(key, {"reason": group["reason"], "members": group["members"], "widths": [],
                                    "count": 0})
        row["count"] += 1
        row["widths"] += [] if group["width"] in row["widths"] else [group["width"]]
    return list(rows.values())


def groups_text(view: dict) -> list[str]:
    """A view's pruning groups in words: what can be pruned, the streams left alone, then each reason
    something is frozen, naming its node. No lines where the view has none (an older cache entry)."""
    record = view.get("groups")
    if record is None:
        return []
    frozen = frozen_by_reason(record)
    lines = [f"Pruning groups: {groups_counts(record)}"] + (["Frozen (not pruned):"] if frozen else [])
    for row in frozen:
        times = f" ×{row['count']}" if row["count"] > 1 else ""
        lines.append(f"  {row['reason']}{times}: {'/'.join(map(str, row['widths']))} channels of "
                     f"{', '.join(row['members'])}")
    return lines


def groups_counts(record: dict) -> str:
    """How many groups of each kind a `groups_record` holds, in words: "12 heads groups (36 heads), ..."."""
    heads, units, head_dim, streams = record["heads"], record["units"], record["head_dim"], record["streams"]
    counts = [f"{n} {kind} group{'s' * (n != 1)} ({what})" for n, kind, what in (
        (heads["groups"], "heads", f"{heads['heads']} heads"), (units["groups"], "units", f"{units['units']} units"),
        (head_dim["groups"], "head_dim", f"{head_dim['channels']} channels")) if n]
    if streams:
        counts.append(f"{len(streams)} stream{'s' * (len(streams) != 1)} ({', '.join(map(str, streams))}, left alone)")
    return ", ".join(counts) or "none"


def structure_record(structure) -> dict:
    """The recognised structure as the manifest keeps it: without the per-block node lists only passes need."""
    record = structure.to_dict()
    for block in record["blocks"]:
        block.pop("nodes", None)
    return record


def aligned(after: dict, original, compressed) -> dict:
    """`after`'s block rows in the original model's block order, matched by module names.

    A block that a pass removed whole is a row of zeros, so before and after
    read side by side, block by block.
    """
    if original is None or compressed is None:  # a model compressed by its pruning groups: no blocks to align
        return after
    owner = {name: b.index for b in original.blocks for name in _module_names(b)}
    rows = {}
    for row, block in zip(after["blocks"], compressed.blocks):
        origin = next((owner[n] for n in _module_names(block) if n in owner), None)
        if origin is not None:
            rows.setdefault(origin, {**row, "index": origin})
    gone = {"heads": 0, "hidden": 0, "params": 0, "macs": 0}
    blocks = [rows.get(b.index, {"index": b.index, "tokens": b.tokens, **gone}) for b in original.blocks]
    return {**after, "blocks": blocks}


def aligned_summary(program, original) -> dict:
    """The summary of `program` aligned to the `original` structure's blocks; for a decomposed model, its
    parts' summed block by block (each part's own in `parts`), with the fusion in the head."""
    if not program.parts:
        return aligned(summary(program), original, program.structure)
    from evc.ir.macs import params_of

    parts = [aligned(summary(p.program), original, p.program.structure) for p in program.parts]
    fusion = {"params": params_of(program.graph, ["fusion"]), "macs": program.fusion.linear.weight.numel()}
    blocks = [{**rows[0], **{k: sum(r[k] for r in rows) for k in ("heads", "hidden", "params", "macs")},
               "parts": {k: {c: sum(r["parts"][k][c] for r in rows if r.get("parts")) for c in ("params", "macs")}
                         for k in ("attention", "mlp", "tokens")}}
              for rows in zip(*(p["blocks"] for p in parts))]
    stem, head = ({k: sum(p[part][k] for p in parts) for k in ("params", "macs")} for part in ("stem", "head"))
    head = {k: head[k] + fusion[k] for k in head}
    total = {k: sum(p["total"][k] for p in parts) + fusion[k] for k in ("params", "macs")}
    return canonical({"stem": stem, "blocks": blocks, "head": head, "total": total,
                      "parts": [{"name": p.name, "classes": list(p.classes), "width": p.width, **s["total"]}
                                for p, s in zip(program.parts, parts)],
                      "fusion": fusion})


def _module_names(block) -> list[str]:
    names = [*block.attn.qkv, block.attn.proj, *block.attn.mixers] if block.attn else []
    return names + ([block.mlp.fc1, block.mlp.fc2, *filter(None, [block.mlp.gate])] if block.mlp else [])
