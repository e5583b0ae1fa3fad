"""The spec's syntax tree: frozen dataclasses that carry their source spans.

Nothing downstream of `evc.spec.parse` sees lark's trees; checking works on
these, and the Plan it produces keeps the spans so later errors (a per-layer
list that does not match the model's depth) still point into the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction as _Fraction

from evc.errors import Span


@dataclass(frozen=True)
class Number:
    value: int | float
    span: Span

    def describe(self) -> str:
        return "an integer" if isinstance(self.value, int) else "a number"


@dataclass(frozen=True)
class Fraction:
    """`2/3`: exact, so `keep = 2/3` of 12 heads is 8, not 7."""

    value: _Fraction
    span: Span

    def describe(self) -> str:
        return "a fraction"


@dataclass(frozen=True)
class Percent:
    value: float  # as written: 70% is 70.0
    span: Span

    def describe(self) -> str:
        return "a percentage"


@dataclass(frozen=True)
class Quantity:
    """`600M` (a count) or `12ms` (a time): the number as written and its unit."""

    value: float
    unit: str  # K, M, G, or a time: ms, us, s, min
    span: Span

    SCALE = {"K": 1e3, "M": 1e6, "G": 1e9, "ms": 1e-3, "us": 1e-6, "s": 1.0, "min": 60.0}

    @property
    def amount(self) -> float:
        """In plain units: a count, or seconds."""
        return self.value * self.SCALE[self.unit]

    @property
    def is_time(self) -> bool:
        return self.unit in ("ms", "us", "s", "min")

    def describe(self) -> str:
        return "a time" if self.is_time else "a count"


@dataclass(frozen=True)
class String:
    value: str
    span: Span

    def describe(self) -> str:
        return "a string"


@dataclass(frozen=True)
class Ident:
    name: str
    span: Span

    def describe(self) -> str:
        return "a name"


@dataclass(frozen=True)
class List:
    items: tuple[Value, ...]
    span: Span

    def describe(self) -> str:
        return "a list"


@dataclass(frozen=True)
class Keyword:
    name: str
    value: Value
    span: Span  # of the name


@dataclass(frozen=True)
class Call:
    """`timm("deit_tiny_patch16_224")`, `image(224, 224, mean = [...])`: data, never executed."""

    name: str
    args: tuple[Value, ...]
    kwargs: tuple[Keyword, ...]
    span: Span

    def describe(self) -> str:
        return f"a call to {self.name}(...)"


@dataclass(frozen=True)
class Table:
    """`{ tolerance = 0.01, step = 8 }`: entries only; its keys are checked by a Record parameter."""

    entries: tuple[Entry, ...]
    span: Span  # from `{` to `}`

    def describe(self) -> str:
        return "a table"


Value = Number | Quantity | Fraction | Percent | String | Ident | List | Call | Table


@dataclass(frozen=True)
class Entry:
    """`key = value`; `span` covers the key."""

    key: str
    value: Value
    span: Span


@dataclass(frozen=True)
class Block:
    """`kind name { items }`. Inside `compress`, each pass is a nested Block with no name."""

    kind: str
    name: str | None
    items: tuple[Entry | Block, ...]
    span: Span  # of the kind word
    name_span: Span | None

    @property
    def entries(self) -> tuple[Entry, ...]:
        return tuple(i for i in self.items if isinstance(i, Entry))

    @property
    def nested(self) -> tuple[Block, ...]:
        return tuple(i for i in self.items if isinstance(i, Block))


@dataclass(frozen=True)
class Spec:
    path: str
    source: str
    version: int
    version_span: Span  # the number
    header_span: Span  # the whole `evc 1` line: where errors about the whole file point
    blocks: tuple[Block, ...]
