"""Spec text to AST: the lark grammar in `evc.lark`, and one Transformer method per rule.

The parser is `_parser.py`, lark's standalone LALR parser generated from the grammar (evc.spec.generate):
loading it costs a fraction of importing lark.

    >>> spec = parse_spec("evc 1\\nmodel m { source = timm(\\"deit_tiny_patch16_224\\") }", "m.evc")
    >>> spec.blocks[0].kind, spec.blocks[0].entries[0].value.name
    ('model', 'timm')
"""

from __future__ import annotations

import math
import re
import warnings
from fractions import Fraction
from functools import cache

from evc.errors import Span, SpecError
from evc.spec import _parser, ast

LANGUAGE_VERSIONS = (1,)

# How lark's terminal names read in a message.
_TERMINALS = {
    "EQUAL": "'='",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "LSQB": "'['",
    "RSQB": "']'",
    "LPAR": "'('",
    "RPAR": "')'",
    "COMMA": "','",
    "SLASH": "'/'",
    "PERCENT": "'%'",
    "EVC": "'evc'",
    "_SEP": "a line break or ','",
    "_NL": "a line break",
    "NAME": "a name",
    "STRING": "a string",
    "INT": "a number",
    "FLOAT": "a number",
    "SIGNED_INT": "a number",
    "SIGNED_FLOAT": "a number",
    "$END": "end of file",
}


@cache
def _lalr() -> _parser.Lark:
    return _parser.Lark_StandAlone()


def parse_spec(text: str, path: str) -> ast.Spec:
    """Parse spec text; a syntax error raises SpecError with its file:line:col."""
    try:
        tree = _lalr().parse(text)
    except _parser.UnexpectedInput as e:
        raise _syntax_error(e, text, path) from None
    try:
        spec = _ToAst(path, text).transform(tree)
    except _parser.VisitError as e:
        if isinstance(e.orig_exc, SpecError):
            raise e.orig_exc from None
        raise
    if spec.version not in LANGUAGE_VERSIONS:
        raise SpecError.at(
            path, text, spec.version_span,
            f"unknown spec language version {spec.version}",
            hint=f"this evc reads version {', '.join(map(str, LANGUAGE_VERSIONS))}",
        )
    return spec


def _span(item) -> Span:
    """The span of a lark Token or of a Tree's meta."""
    return Span(item.line, item.column, item.end_line, item.end_column)


class _ToAst(_parser.Transformer):
    def __init__(self, path: str, source: str):
        super().__init__()
        self.path, self.source = path, source

    @_parser.v_args(meta=True)
    def start(self, meta, children):
        version, *blocks = children
        number, number_span, header_span = version
        return ast.Spec(self.path, self.source, number, number_span, header_span, tuple(blocks))

    @_parser.v_args(meta=True)
    def version(self, meta, children):
        (token,) = children
        return int(token), _span(token), _span(meta)

    def block(self, children):
        kind, *rest = children
        name = rest[0] if len(rest) == 2 else None
        items = rest[-1]
        return ast.Block(str(kind), str(name) if name else None, items, _span(kind), _span(name) if name else None)

    def body(self, children):
        return tuple(children)

    def nested(self, children):
        name, items = children
        return ast.Block(str(name), None, items, _span(name), None)

    def entry(self, children):
        key, value = children
        return ast.Entry(str(key), value, _span(key))

    def number(self, children):
        (token,) = children
        text = str(token)
        is_int = token.type in ("INT", "SIGNED_INT")
        return ast.Number(self.finite(int(text) if is_int else float(text), _span(token)), _span(token))

    @_parser.v_args(meta=True)
    def fraction(self, meta, children):
        num, den = children
        span = _span(meta)
        if int(den) == 0:
            raise SpecError.at(self.path, self.source, span, "division by zero in a fraction")
        return ast.Fraction(self.finite(Fraction(int(num), int(den)), span), span)

    @_parser.v_args(meta=True)
    def percent(self, meta, children):
        (token,) = children
        return ast.Percent(self.finite(float(token), _span(meta)), _span(meta))

    def quantity(self, children):
        (token,) = children
        text = str(token)
        unit = text.lstrip("0123456789.")
        number = text[:len(text) - len(unit)]
        return ast.Quantity(self.finite(float(number), _span(token)), unit, _span(token))

    def finite(self, value, span):
        """`value`, when a double holds it: `1e999` and a 400-digit integer are errors at their place, not an
        infinity or an overflow for the keys that read them."""
        try:
            as_float = float(value)
        except OverflowError:
            as_float = math.inf
        if not math.isfinite(as_float):
            raise SpecError.at(self.path, self.source, span, "this number is too large: a spec's numbers must fit "
                               "a 64-bit float (about 1.8e308 at most)")
        return value

    def string(self, children):
        (token,) = children
        raw = str(token)[1:-1]
        if "\\" not in raw:
            return ast.String(raw, _span(token))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", DeprecationWarning)  # Python's word for an unknown escape
                return ast.String(raw.encode("latin-1", "backslashreplace").decode("unicode_escape"), _span(token))
        except (UnicodeDecodeError, DeprecationWarning) as e:
            found = re.search(r"invalid escape sequence '[^']*'", str(e))
            reason = e.reason if isinstance(e, UnicodeDecodeError) else found.group(0) if found else str(e)
            raise SpecError.at(self.path, self.source, _span(token),
                               f"a bad escape in a string: {reason} (write a backslash as two)") from None

    def ident(self, children):
        (token,) = children
        return ast.Ident(str(token), _span(token))

    @_parser.v_args(meta=True)
    def list(self, meta, children):
        return ast.List(tuple(c for c in children if c is not None), _span(meta))

    @_parser.v_args(meta=True)
    def call(self, meta, children):
        name, *arguments = (c for c in children if c is not None)
        args = tuple(a for a in arguments if not isinstance(a, ast.Keyword))
        kwargs = tuple(a for a in arguments if isinstance(a, ast.Keyword))
        if kwargs and any(arguments.index(a) > arguments.index(kwargs[0]) for a in args):
            raise SpecError.at(
                self.path, self.source, args[-1].span,
                "positional argument after a keyword argument",
            )
        return ast.Call(str(name), args, kwargs, _span(meta))

    @_parser.v_args(meta=True)
    def table(self, meta, children):
        (items,) = children
        for item in items:
            if isinstance(item, ast.Block):
                raise SpecError.at(
                    self.path, self.source, item.span,
                    f"a table holds `key = value` entries, not blocks such as `{item.kind} {{ ... }}`",
                    hint=f"for a table inside this one, write `{item.kind} = {{ ... }}`",
                )
        return ast.Table(items, _span(meta))

    def keyword(self, children):
        name, value = children
        return ast.Keyword(str(name), value, _span(name))


def _syntax_error(e: _parser.UnexpectedInput, text: str, path: str) -> SpecError:
    line, col = e.line, e.column
    if isinstance(e, _parser.UnexpectedCharacters):
        char = text[e.pos_in_stream] if e.pos_in_stream < len(text) else ""
        if char == '"':
            message = "unterminated string"
        else:
            message = f"unexpected character {char!r}"
        return SpecError.at(path, text, Span(line, col, line, col + 1), message)
    if isinstance(e, _parser.UnexpectedEOF) or getattr(e, "token", None) is None or e.token.type == "$END":
        span = _after_last_line(text)
        return SpecError.at(path, text, span, f"unexpected end of file; expected {_expected(e)}")
    token = e.token
    span = _span(token)
    if token.line == 1 and "EVC" in e.expected:
        return SpecError.at(path, text, span, "a spec starts with its language version, as in `evc 1`")
    shown = "a line break" if token.type in ("_NL", "_SEP") and "\n" in token else repr(str(token))
    return SpecError.at(path, text, span, f"unexpected {shown}; expected {_expected(e)}")


def _after_last_line(text: str) -> Span:
    """Just after the last line that holds more than a comment."""
    lines = text.splitlines() or [""]
    number = next((i for i in range(len(lines), 0, -1)
                   if lines[i - 1].strip() and not lines[i - 1].lstrip().startswith("#")), len(lines))
    end = len(lines[number - 1].rstrip()) + 1
    return Span(number, end, number, end + 1)


def _expected(e: _parser.UnexpectedInput) -> str:
    names = sorted({_TERMINALS.get(t, t) for t in getattr(e, "expected", ()) or ()})
    if not names:
        return "more input"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
