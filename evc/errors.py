"""The errors evc reports to people.

Every user-facing failure is an `EvcError`. The CLI alone turns one into text
and an exit code: 2 for bad input (a spec, a checkpoint, a model evc cannot
recognise), 1 for a build that ran and failed (parity, a lowering crash) or a
collaborative run that failed at a peer.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass


def first_line(error: BaseException) -> str:
    """A library's exception in one line: its first non-empty one, or its type when it says nothing."""
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)


@dataclass(frozen=True)
class Span:
    """A 1-based, end-exclusive region of a spec's text."""

    line: int
    col: int
    end_line: int
    end_col: int


@dataclass(frozen=True)
class Diagnostic:
    message: str
    span: Span | None = None
    hint: str | None = None


class EvcError(Exception):
    """An error a user can act on. `exit_code` 2 is bad input, 1 a failed build."""

    exit_code = 2

    def render(self) -> str:
        return f"error: {self}"


class InputError(EvcError):
    """Bad input outside the spec text: a missing file, a checkpoint that does not fit."""


class BuildError(EvcError):
    """The build ran and failed; what it names (a node, an artifact) is at fault."""

    exit_code = 1


class PassFailure(BuildError):
    """A pass made a model that does not compute what it should: evc's own fault, not the user's. The message
    names the group or node; `reproducer` holds what reproduces it (the captured graph, the group, the input),
    which the driver writes into the build folder."""

    def __init__(self, message: str, reproducer: dict | None = None):
        super().__init__(message)
        self.reproducer = reproducer

    def render(self) -> str:
        return f"internal error: {self}"


class ResourceError(BuildError):
    """The machine refused a write: no space, no permission, a read-only or vanished folder. The message names
    the path, what evc was writing and, for space, the bytes it needed and those free."""


class PeerError(EvcError):
    """A collaborative run failed at a peer (down, slower than the deadline, a malformed reply) and no
    answer was possible without it; the message names the peer's address and its part."""

    exit_code = 1


class SpecError(EvcError):
    """One or more diagnostics against a spec file, each with its source span."""

    def __init__(self, path: str, source: str, diagnostics: list[Diagnostic]):
        self.path, self.source, self.diagnostics = path, source, diagnostics
        super().__init__(diagnostics[0].message if diagnostics else "invalid spec")

    @classmethod
    def at(cls, path: str, source: str, span: Span | None, message: str, hint: str | None = None):
        return cls(path, source, [Diagnostic(message, span, hint)])

    def render(self) -> str:
        return "\n".join(render_diagnostic(self.path, self.source, d) for d in self.diagnostics)


def render_diagnostic(path: str, source: str, d: Diagnostic) -> str:
    """rustc-style text: `path:line:col: error: message`, the line, a caret under the span."""
    if d.span is None:
        text = f"{path}: error: {d.message}"
        return text + (f"\n  = help: {d.hint}" if d.hint else "")
    line, col = d.span.line, d.span.col
    lines = source.splitlines()
    code = lines[line - 1] if 0 < line <= len(lines) else ""
    end = d.span.end_col if d.span.end_line == line else len(code) + 1
    width = max(1, end - col)
    gutter = " " * len(str(line))
    caret = " " * (col - 1) + "^" * width + (f" {d.hint}" if d.hint else "")
    return (
        f"{path}:{line}:{col}: error: {d.message}\n"
        f"{gutter} |\n"
        f"{line} | {code}\n"
        f"{gutter} | {caret}"
    )


@contextmanager
def at_value(plan, spans: dict, *keys: str):
    """An InputError raised inside, found in a value the spec gives, as a SpecError at that value.

    `spans` are a block's value spans by key; the first of `keys` the block writes is where the error
    points (so an error about the model's outputs points at `output` when the spec gives one, else at
    `source`). Errors found later than checking (once the model is loaded) then read as checking's do:

        with at_value(plan, plan.model.spans, "source"):
            module = build_module(plan.model.source, spec_dir)   # timm has no model 'vit_tiny_patch16_22'
    """
    try:
        yield
    except SpecError:
        raise
    except InputError as e:
        span = next((spans[k] for k in keys if spans.get(k) is not None), None)
        if plan is None or span is None:
            raise
        raise plan.error(span, str(e)) from None
