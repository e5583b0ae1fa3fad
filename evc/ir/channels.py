"""Index spaces of tensor axes, joined when their channels must be removed together (`evc.ir.groups`).

    spaces = Spaces()
    qkv, heads, head_dim = spaces.new(576), spaces.new(3), spaces.new(64)
    spaces.split(qkv, "product", [spaces.new(3), heads, head_dim])   # a reshape to (3, heads, head_dim)
    spaces.union(heads, other)             # one channel of either is one channel of both
    spaces.mark(head_dim, "frozen", "softmax at node 'softmax_2' normalises over it")
    spaces.coords(qkv)                     # {leaf: the leaf's channel of each of qkv's 576 entries}

A space is the index set of one tensor axis. A union-find joins spaces whose
index i is the same channel; a class may be split, as the concatenation of
parts (cat, split, chunk) or as the row-major product of factors (a reshape to
(heads, head_dim)). The classes no split divides further, the leaves, are what
can be pruned: removing channel c of a leaf removes every entry of every space
whose coordinate on that leaf is c.
"""

from __future__ import annotations

import math

import numpy as np


class Spaces:
    def __init__(self):
        self.size: list[int] = []
        self.parent: list[int] = []
        self.splits: dict[int, tuple[str, tuple[int, ...]]] = {}
        self.marks: dict[int, dict[str, str]] = {}
        self.where = ""  # the node being read: conflicts are blamed on it

    def new(self, size: int) -> int:
        self.size.append(size)
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def mark(self, s: int, key: str, value: str) -> None:
        """Remember `key` of the class of `s` (the first value stays): frozen, norm, residual, batch, contracted."""
        self.marks.setdefault(self.find(s), {}).setdefault(key, value)

    def marked(self, s: int, key: str) -> str | None:
        return self.marks.get(self.find(s), {}).get(key)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            reason = f"node '{self.where}' joins axes of {self.size[ra]} and {self.size[rb]} channels"
            self.mark(ra, "frozen", reason)
            self.mark(rb, "frozen", reason)
            return
        self.parent[rb] = ra
        for key, value in self.marks.pop(rb, {}).items():
            self.mark(ra, key, value)
        theirs = self.splits.pop(rb, None)
        if theirs is not None:
            self.split(ra, *theirs)

    def split(self, s: int, kind: str, parts) -> None:
        """The class of `s` is the `kind` ("concat" or "product") of `parts`; a second split of the same
        sizes joins the parts pairwise, a different one freezes the class."""
        r, parts = self.find(s), tuple(parts)
        sizes = [self.size[p] for p in parts]
        total = sum(sizes) if kind == "concat" else math.prod(sizes)
        if total != self.size[r]:
            self.mark(r, "frozen", f"node '{self.where}' splits {self.size[r]} channels as {sizes}")
            return
        known = self.splits.get(r)
        if known is None:
            self.splits[r] = (kind, parts)
        elif known[0] == kind and [self.size[p] for p in known[1]] == sizes:
            for mine, theirs in zip(known[1], parts):
                self.union(mine, theirs)
        elif not self._refine(r, *((known[1], parts) if kind == "concat" else (parts, known[1]))):
            self.mark(r, "frozen", f"node '{self.where}' splits {self.size[r]} channels two ways")

    def _refine(self, r: int, factors: tuple[int, ...], pieces: tuple[int, ...]) -> bool:
        """The class of `r`, a product of `factors` (heads, head_dim) and a concatenation of `pieces` cut
        between whole entries of its first factor (CoaT's channels of 2, 3 and 3 heads), is both: the first
        factor is the concatenation of its entries in each piece, and each piece the product of those and
        the other factors."""
        inner = math.prod(self.size[f] for f in factors[1:])
        if any(self.size[p] % inner for p in pieces):
            return False
        firsts = [self.new(self.size[p] // inner) for p in pieces]
        self.splits[r] = ("product", tuple(factors))
        self.split(factors[0], "concat", firsts)
        for piece, first in zip(pieces, firsts):
            self.split(piece, "product", [first, *factors[1:]])
        return True

    def parts(self, s: int) -> tuple[str, tuple[int, ...]] | None:
        split = self.splits.get(self.find(s))
        return (split[0], tuple(self.find(p) for p in split[1])) if split else None

    def coords(self, s: int, seen: frozenset = frozenset()) -> dict[int, np.ndarray]:
        """{leaf: channel of that leaf, or -1, for each index of `s`}, through every split below it."""
        r = self.find(s)
        split = self.parts(r)
        if split is None or r in seen:
            return {r: np.arange(self.size[r])}
        kind, parts = split
        out: dict[int, np.ndarray] = {}
        if kind == "concat":
            offset = 0
            for p in parts:
                for leaf, channel in self.coords(p, seen | {r}).items():
                    out.setdefault(leaf, np.full(self.size[r], -1))[offset:offset + self.size[p]] = channel
                offset += self.size[p]
            return out
        grid = np.indices([self.size[p] for p in parts]).reshape(len(parts), -1)
        for axis, p in enumerate(parts):
            for leaf, channel in self.coords(p, seen | {r}).items():
                if leaf in out:  # one leaf in two factors: its channels are not a slice
                    self.mark(leaf, "frozen", f"{self.size[leaf]} channels appear twice in one product")
                out[leaf] = channel[grid[axis]]
        return out

    def above(self) -> dict[int, set[int]]:
        """{class: the classes split into it}: read after the last union."""
        above: dict[int, set[int]] = {}
        for r in list(self.splits):
            for p in self.parts(r)[1]:
                above.setdefault(p, set()).add(self.find(r))
        return above

    def ancestors(self, leaf: int, above: dict[int, set[int]]) -> list[int]:
        """The leaf's class and every class split into it, at any depth."""
        found, frontier = [], [self.find(leaf)]
        while frontier:
            c = frontier.pop()
            if c not in found:
                found.append(c)
                frontier.extend(above.get(c, ()))
        return found
