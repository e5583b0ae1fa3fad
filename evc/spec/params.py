"""Parameter declarations: one place per pass, target and block that drives
checking, defaults, `evc explain` and the README's tables.

    KEEP = Param("keep", FractionOf(), 1.0, "share of heads to keep", per_layer=True)

A Kind turns one spec value into a Python value or raises Invalid with the
span at fault. Ranges live in the Kind, so the message says what was allowed.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from evc.errors import Span
from evc.spec import ast


class Invalid(Exception):
    def __init__(self, message: str, span: Span | None, hint: str | None = None):
        super().__init__(message)
        self.message, self.span, self.hint = message, span, hint


def closest(word: str, choices) -> str | None:
    """The choice `word` is most likely a misspelling of, or None."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: str, choices) -> str | None:
    close = closest(word, choices)
    return f"did you mean '{close}'?" if close else None


def _number(value: ast.Value, what: str) -> float | Fraction:
    if isinstance(value, ast.Number):
        return value.value
    if isinstance(value, ast.Fraction):
        return value.value
    if isinstance(value, ast.Percent):
        return Fraction(str(value.value)) / 100
    raise Invalid(f"expected {what}, found {value.describe()}", value.span)


class Kind:
    """What a parameter accepts; `text` reads well in messages and tables, `example` stands for a value."""

    text = "a value"
    example = "..."

    def check(self, value: ast.Value) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Ratio(Kind):
    """A share such as `keep`: `0.5`, `2/3` or `70%`, in (low, high]."""

    low: float = 0.0
    high: float = 1.0

    @property
    def text(self) -> str:
        return f"a fraction in ({self.low:g}, {self.high:g}]"

    def check(self, value):
        x = _number(value, self.text)
        if not self.low < x <= self.high:
            raise Invalid(f"{_show(value)} is out of range: expected {self.text}", value.span)
        return float(x)


@dataclass(frozen=True)
class Amount(Kind):
    """A budget: a share of the model's own (`50%`, `1/2`, `0.5`) or a count (`600M`, `8M`, `2.5e6`).
    Checks to ("share", x) or ("count", n)."""

    text = "a share (50%, 1/2) or a count (600M, 8M)"
    example = "50%"

    def check(self, value):
        if isinstance(value, ast.Quantity) and not value.is_time:
            return ("count", value.amount)
        if isinstance(value, ast.Quantity):
            raise Invalid(f"expected {self.text}, found {_show(value)}, a time", value.span)
        x = _number(value, self.text)
        if x <= 0:
            raise Invalid(f"{_show(value)} is out of range: expected {self.text}, above 0", value.span)
        return ("share", float(x)) if x <= 1 else ("count", float(x))


@dataclass(frozen=True)
class Time(Kind):
    """A latency budget: a time (`12ms`, `800us`) or a share of the model's own (`50%`). Checks to
    ("ms", t) or ("share", x)."""

    text = "a time (12ms, 800us) or a share of the model's own (50%)"
    example = "12ms"

    def check(self, value):
        if isinstance(value, ast.Quantity) and value.is_time:
            return ("ms", value.amount * 1e3)
        if isinstance(value, ast.Quantity):
            raise Invalid(f"expected {self.text}, found {_show(value)}, a count", value.span)
        x = _number(value, self.text)
        if not 0 < x <= 1:
            raise Invalid(f"{_show(value)} is out of range: expected {self.text}; a bare number is a share in "
                          "(0, 1], and a time takes its unit", value.span)
        return ("share", float(x))


@dataclass(frozen=True)
class Duration(Kind):
    """A limit in wall-clock time: `90s`, `10min`, `500ms`. Checks to seconds."""

    text = "a duration (90s, 10min)"
    example = "10min"

    def check(self, value):
        if not (isinstance(value, ast.Quantity) and value.is_time):
            raise Invalid(f"expected {self.text}, found {_show(value)}", value.span)
        if value.amount <= 0:
            raise Invalid(f"{_show(value)} is out of range: expected {self.text}, above 0", value.span)
        return value.amount


@dataclass(frozen=True)
class Int(Kind):
    low: int | None = None
    high: int | None = None
    example = "N"

    @property
    def text(self) -> str:
        return "an integer" + _range_text(self.low, self.high)

    def check(self, value):
        if not isinstance(value, ast.Number) or not isinstance(value.value, int):
            raise Invalid(f"expected {self.text}, found {value.describe()}", value.span)
        _in_range(value, value.value, self.low, self.high, self.text)
        return value.value


@dataclass(frozen=True)
class Float(Kind):
    low: float | None = None
    high: float | None = None
    open_low: bool = False  # (low, high] rather than [low, high]

    @property
    def text(self) -> str:
        if self.open_low and self.low is not None:
            return f"a number > {self.low:g}" + (f" and <= {self.high:g}" if self.high is not None else "")
        return "a number" + _range_text(self.low, self.high)

    def check(self, value):
        x = float(_number(value, self.text))
        if self.open_low and self.low is not None and x <= self.low:
            raise Invalid(f"{_show(value)} is out of range: expected {self.text}", value.span)
        _in_range(value, x, self.low, self.high, self.text)
        return x


@dataclass(frozen=True)
class Choice(Kind):
    options: tuple[str, ...]

    @property
    def text(self) -> str:
        return "one of " + ", ".join(self.options)

    def check(self, value):
        if not isinstance(value, (ast.Ident, ast.String)):
            raise Invalid(f"expected {self.text}, found {value.describe()}", value.span)
        word = value.name if isinstance(value, ast.Ident) else value.value
        if word not in self.options:
            raise Invalid(f"unknown value '{word}': expected {self.text}", value.span,
                          did_you_mean(word, self.options))
        return word


@dataclass(frozen=True)
class Flag(Kind):
    """`fuse = true`: the spec has no boolean literal, so `true` and `false` are names."""

    text = "true or false"

    def check(self, value):
        if not isinstance(value, ast.Ident) or value.name not in ("true", "false"):
            raise Invalid(f"expected {self.text}, found {_show(value)}", value.span)
        return value.name == "true"


@dataclass(frozen=True)
class Text(Kind):
    """A string; `pattern` (a regex) and `shape` (how to describe it) constrain it."""

    pattern: str | None = None
    shape: str = "a string"

    @property
    def text(self) -> str:
        return self.shape

    def check(self, value):
        if not isinstance(value, ast.String):
            raise Invalid(f"expected {self.text}, found {value.describe()}", value.span)
        if self.pattern and not re.fullmatch(self.pattern, value.value):
            raise Invalid(f"{_show(value)} is not {self.text}", value.span)
        return value.value


class _BlockName(Kind):
    """The name of another block, written bare; whether it exists is checked against the spec."""

    def check(self, value):
        if not isinstance(value, ast.Ident):
            raise Invalid(f"expected {self.text}, found {value.describe()}", value.span)
        return value.name


@dataclass(frozen=True)
class DataRef(_BlockName):
    """The name of a `data` block."""

    text = "the name of a data block"
    example = "<a data block>"


@dataclass(frozen=True)
class TargetRef(_BlockName):
    """The name of a `target` block."""

    text = "the name of a target block"
    example = "<a target block>"


@dataclass(frozen=True)
class ModelRef(_BlockName):
    """The name of another `model` block (a teacher), or one of `builtin`."""

    builtin: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return " or ".join((*self.builtin, "the name of another model block"))


@dataclass(frozen=True)
class ListOf(Kind):
    item: Kind
    length: int | None = None
    or_single: bool = False  # `threads = 4` is the list [4]
    empty_ok: bool = False
    example = "[...]"

    @property
    def text(self) -> str:
        if self.or_single:
            return f"{self.item.text}, or a list of them"
        n = f"{self.length} " if self.length else ""
        return f"a list of {n}values, each {self.item.text}"

    def check(self, value):
        if not isinstance(value, ast.List):
            if self.or_single:
                return (self.item.check(value),)
            raise Invalid(f"expected {self.text}, found {value.describe()}", value.span)
        if self.length is not None and len(value.items) != self.length:
            raise Invalid(f"expected {self.length} values, found {len(value.items)}", value.span)
        if not value.items and not self.empty_ok:
            raise Invalid("expected at least one value, found an empty list", value.span)
        return tuple(self.item.check(v) for v in value.items)


@dataclass(frozen=True)
class AnyOf(Kind):
    kinds: tuple[Kind, ...]

    @property
    def text(self) -> str:
        return " or ".join(k.text for k in self.kinds)

    def check(self, value):
        for kind in self.kinds:
            try:
                return kind.check(value)
            except Invalid:
                continue
        raise Invalid(f"expected {self.text}, found {_show(value)}", value.span)


@dataclass(frozen=True)
class Record(Kind):
    """A table whose keys are declared like a block's: `search = { tolerance = 0.01, step = 8 }`.

    It checks to a plain dict that holds every declared key, defaults filled in.
    """

    params: tuple[Param, ...]

    @property
    def text(self) -> str:
        return "a table of " + ", ".join(p.name for p in self.params)

    def check(self, value):
        if not isinstance(value, ast.Table):
            raise Invalid(f"expected {self.text}, found {value.describe()}", value.span)
        values, problems = check_entries(value.entries, self.params, "the table", value.span)
        if problems:
            raise problems[0]  # Invalid carries one span; the first problem is enough to act on
        return values


REQUIRED = object()


@dataclass(frozen=True)
class When:
    """A condition on another key of the same block: `When("score", ("taylor",))` holds when score is
    taylor; with no values, when that key has a value at all."""

    key: str
    values: tuple = ()

    def holds(self, values: dict) -> bool:
        value = values.get(self.key)
        return value is not None and value is not False and (not self.values or value in self.values)

    def __str__(self) -> str:
        return f"{self.key} = {' or '.join(map(str, self.values))}" if self.values else self.key

    def met(self, values: dict) -> str:
        """How the condition holds for `values`: `score = activation`."""
        return f"{self.key} = {values[self.key]}" if self.values else self.key


@dataclass(frozen=True)
class Param:
    """One key of a block: its name, what it accepts, its default, one line of help.

    A `per_layer` parameter takes one value or a list as long as the model's
    depth; the length is checked once the model is known.
    """

    name: str
    kind: Kind
    default: Any = REQUIRED
    help: str = ""
    per_layer: bool = False
    # Rules across the block's keys, checked with it and shown in the README's tables:
    needed_when: tuple[When, ...] = ()  # the key must have a value when all of these hold
    only_with: str | None = None  # the key means something only beside this one
    not_with: tuple[str, ...] = ()  # the key cannot be given with any of these

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def rules_text(self) -> str:
        """The key's rules as the README's tables say them."""
        rules = []
        if self.needed_when:
            rules.append("needed when " + " with ".join(map(str, self.needed_when)))
        if self.only_with:
            rules.append(f"only with `{self.only_with}`")
        if self.not_with:
            rules.append("not with " + ", ".join(f"`{k}`" for k in self.not_with))
        return "; ".join(rules)

    def broken_rule(self, values: dict, spans: dict) -> Invalid | None:
        """The first rule that checked `values` break, at the span it concerns; `spans` holds the keys given."""
        if self.needed_when and values.get(self.name) is None and all(w.holds(values) for w in self.needed_when):
            condition = " with ".join(w.met(values) for w in self.needed_when)
            return Invalid(f"{condition} needs {self.name}: add `{self.name} = {self.kind.example}`",
                           spans.get(self.needed_when[0].key))
        if self.name not in spans:
            return None
        if self.only_with and self.only_with not in spans:
            return Invalid(f"{self.name}: applies only with `{self.only_with}`", spans[self.name])
        clash = next((k for k in self.not_with if k in spans), None)
        if clash is not None:
            return Invalid(f"give either `{self.name}` or `{clash}`, not both", spans[self.name])
        return None

    def check(self, value: ast.Value) -> Any:
        if self.per_layer and isinstance(value, ast.List):
            return PerLayer(tuple(self.kind.check(v) for v in value.items), value.span)
        return self.kind.check(value)

    def describe_default(self) -> str:
        if self.required:
            return "required"
        if self.default is None:
            return "none"
        if isinstance(self.default, bool):
            return "true" if self.default else "false"  # as a spec writes it
        if isinstance(self.default, tuple):
            return "[" + ", ".join(map(str, self.default)) + "]"
        return str(self.default)


@dataclass(frozen=True)
class PerLayer:
    """A per-layer list as written; `for_depth` checks it against the model."""

    values: tuple
    span: Span = field(compare=False)

    def for_depth(self, depth: int) -> tuple:
        if len(self.values) != depth:
            raise Invalid(
                f"expected one value per block: the model has depth {depth}, "
                f"this list has {len(self.values)}",
                self.span,
            )
        return self.values


def check_entries(entries: tuple[ast.Entry, ...], params: tuple[Param, ...], where: str, at: Span | None,
                  skip: tuple[str, ...] = ()) -> tuple[dict, list[Invalid]]:
    """Check `key = value` entries against declared params: the values, every default filled in, and the problems.

    A block's body and a Record's table are checked alike; `where` names the
    holder in messages, `at` is where a missing key is reported, and keys in
    `skip` are accepted unchecked and left out of the values.
    """
    by_name = {p.name: p for p in params}
    values: dict[str, Any] = {}
    problems: list[Invalid] = []
    # A misspelt key is reported once, as unknown: the missing key it was meant to be follows from it.
    misspelt = {closest(e.key, by_name) for e in entries if e.key not in by_name}
    for entry in entries:
        param = by_name.get(entry.key)
        if param is None:
            problems.append(Invalid(f"unknown key '{entry.key}' in {where}", entry.span,
                                    did_you_mean(entry.key, by_name)))
        elif entry.key in values:
            problems.append(Invalid(f"duplicate key '{entry.key}' in {where}", entry.span))
        elif entry.key in skip:
            values[entry.key] = None
        else:
            try:
                values[entry.key] = param.check(entry.value)
            except Invalid as e:
                problems.append(Invalid(f"{entry.key}: {e.message}", e.span, e.hint))
                values[entry.key] = None
    for param in params:
        if param.name in values or param.name in skip:
            continue
        if param.required and param.name not in misspelt:
            problems.append(Invalid(f"{where} is missing required key '{param.name}'", at, param.help or None))
        else:
            values[param.name] = param.default
    for key in skip:
        values.pop(key, None)
    if not problems:
        given = {entry.key: entry.value.span for entry in entries}
        problems = [broken for p in params if (broken := p.broken_rule(values, given)) is not None]
    return values, problems


def check_rules_declared(params: tuple[Param, ...], where: str) -> None:
    """A rule must name keys the same block declares: checked when a plug-in registers."""
    names = {p.name for p in params}
    for p in params:
        named = [w.key for w in p.needed_when] + [p.only_with] * bool(p.only_with) + list(p.not_with)
        unknown = [k for k in named if k not in names]
        if unknown:
            raise TypeError(f"{where}: parameter '{p.name}' has a rule on undeclared key '{unknown[0]}'")


def data_refs(params: tuple[Param, ...], values: dict, ref: type = None) -> list[str]:
    """The blocks that checked `values` name through DataRef (or `ref`) parameters, inside records too."""
    ref = ref or DataRef
    names = []
    for p in params:
        value = values.get(p.name)
        if isinstance(p.kind, ref) and value:
            names.append(value)
        elif isinstance(p.kind, Record) and value:
            names += data_refs(p.kind.params, value, ref)
    return names


def named_data(entries: tuple[ast.Entry, ...], params: tuple[Param, ...], ref: type = None) -> list[ast.Ident]:
    """The names, as written, that entries give DataRef (or `ref`) parameters, inside tables too: for
    "undefined data"."""
    ref = ref or DataRef
    by_name = {p.name: p for p in params}
    names = []
    for entry in entries:
        kind = by_name[entry.key].kind if entry.key in by_name else None
        if isinstance(kind, ref) and isinstance(entry.value, ast.Ident):
            names.append(entry.value)
        elif isinstance(kind, Record) and isinstance(entry.value, ast.Table):
            names += named_data(entry.value.entries, kind.params, ref)
    return names


def per_layer(value, depth: int) -> tuple:
    """A per-layer parameter's value for each of `depth` blocks."""
    return value.for_depth(depth) if isinstance(value, PerLayer) else (value,) * depth


def _range_text(low, high) -> str:
    if low is not None and high is not None:
        return f" in [{low:g}, {high:g}]"
    if low is not None:
        return f" >= {low:g}"
    if high is not None:
        return f" <= {high:g}"
    return ""


def _in_range(value: ast.Value, x, low, high, text: str) -> None:
    if (low is not None and x < low) or (high is not None and x > high):
        raise Invalid(f"{_show(value)} is out of range: expected {text}", value.span)


def _show(value: ast.Value) -> str:
    if isinstance(value, ast.Number):
        return str(value.value)
    if isinstance(value, ast.Fraction):
        return f"{value.value.numerator}/{value.value.denominator}"
    if isinstance(value, ast.Percent):
        return f"{value.value:g}%"
    if isinstance(value, ast.Quantity):
        return f"{value.value:g}{value.unit}"
    if isinstance(value, ast.String):
        return f'"{value.value}"'
    if isinstance(value, ast.Ident):
        return value.name
    return value.describe()
