"""Write `_parser.py`, the spec parser, from `evc.lark`: lark's standalone LALR parser, its tables built.

    .venv/bin/python -m evc.spec.generate

Run it after editing evc.lark: tests/spec/test_generated.py fails while the parser was made from another
grammar (the parser records the grammar's digest). evc itself never imports lark: loading the generated
module is all `evc check` pays for its parser, where importing lark and loading even cached tables cost
more than Python's own start-up. lark is pinned in the dev extras, as the generated code is its version's.
lark numbers the parser's states in an order that differs from run to run, so an unchanged grammar
regenerates to a different but equivalent text: the test compares what the parsers do, not their text.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

GRAMMAR = Path(__file__).with_name("evc.lark")
PARSER = Path(__file__).with_name("_parser.py")
# What parse.py relies on: positions on every tree node (spans), and no None for an absent optional.
OPTIONS = {"parser": "lalr", "lexer": "contextual", "propagate_positions": True, "maybe_placeholders": False}
# The one edit made to lark's text: it imports the `regex` module where installed, to measure the width of
# patterns with Unicode categories while building tables. The tables come built and the grammar has no such
# pattern, and the import alone costs `evc check` as much as parsing the spec.
REGEX_IMPORT = """try:
    import regex
    _has_regex = True
except ImportError:
    _has_regex = False
"""


def grammar_digest() -> str:
    return hashlib.sha256(GRAMMAR.read_bytes()).hexdigest()


def generate() -> str:
    """The text of `_parser.py` for the grammar as it is now."""
    import lark
    from lark.tools.standalone import gen_standalone

    out = io.StringIO()
    out.write(f"# Generated from evc.lark by `python -m evc.spec.generate`: do not edit.\n"
              f'GRAMMAR_SHA256 = "{grammar_digest()}"\n\n')
    gen_standalone(lark.Lark(GRAMMAR.read_text(), **OPTIONS), out=out)
    text = out.getvalue()
    if text.count(REGEX_IMPORT) != 1:
        raise RuntimeError(f"lark {lark.__version__}'s standalone parser no longer imports regex as evc.spec.generate "
                           "expects: check what it does now before generating")
    return text.replace(REGEX_IMPORT, "_has_regex = False  # evc.spec.generate: the tables come built\n")


def main() -> None:
    from evc.atomic import write_text

    write_text(PARSER, generate())
    print(f"wrote {PARSER}")


if __name__ == "__main__":
    main()
