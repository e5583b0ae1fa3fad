"""What a budget chooses in one pass, block by block: a pass declares it on its registration.

    @register_pass("head_prune", ..., knob=Heads())
    class Heads(Knob):
        def groups(self, program, plan):        # (block, full width, step, least) per block it can narrow
            ...

The search (evc.passes.budget) measures each group at the knob's levels and
writes the chosen widths back as the keys the knob names, so a spec can pin them.
"""

from __future__ import annotations

from fractions import Fraction

from evc.spec.params import PerLayer


def keep_of(width: int, full: int) -> Fraction:
    """The share that head_prune, ffn_prune and patch_slim turn back into exactly `width`."""
    return Fraction(width, full)


def fraction_text(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


class Knob:
    """What a budget chooses in one pass, block by block: its groups, the widths measured, and the keys set."""

    keys: tuple[str, ...] = ("keep",)  # written keys that fix the pass; when none is written, the budget chooses
    timed = True  # a latency table prices what it chooses
    ratio = True  # a share of each block's width: uniform ratios narrow every block alike (not tokens or skips)

    def conflict(self, params: dict) -> tuple[str, str] | None:
        """(key, why) when the pass's other keys, as written, keep a budget from choosing its own; else None."""
        return None

    def groups(self, program, plan) -> list[tuple[int, int, int, int]]:
        """(block, full width, step, least) for each block the pass can narrow."""
        raise NotImplementedError

    def levels(self, full: int, step: int, least: int) -> list[int]:
        """The widths sensitivity is measured at: each when there are few, else 3/4, 1/2, 1/4 and the least."""
        if step == 1 and full <= 16:
            return list(range(least, full))
        shares = [round(full * s / step) * step for s in (0.75, 0.5, 0.25)]
        return sorted({max(least, min(full - step, w)) for w in shares} | {least})

    def values(self, plan, widths: dict[int, Fraction], depth: int) -> dict:
        """The pass's keys for the kept share of each block (1 where not given)."""
        return {"keep": PerLayer(tuple(float(widths.get(b, 1)) for b in range(depth)), None)}

    def record(self, plan, widths: dict[int, Fraction], depth: int) -> dict:
        """The keys as a spec writes them: what the manifest and a lock file keep."""
        return {"keep": [fraction_text(widths.get(b, Fraction(1))) for b in range(depth)]}

    def pinned(self, plan, entry: dict) -> dict:
        """The pass's keys from a record."""
        return {"keep": PerLayer(tuple(float(Fraction(k)) for k in entry["keep"]), None)}
