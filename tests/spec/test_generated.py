"""The committed parser was generated from the grammar as it is, and parses as lark itself does."""

import subprocess
import sys
from pathlib import Path

import lark
import pytest

from evc.spec import _parser, generate

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted([*ROOT.glob("specs/*.evc"), *ROOT.glob("examples/**/*.evc")])
MALFORMED = [
    "model m { }",                                       # no version
    "evc 1\nmodel m { source = }",                       # a value missing
    "evc 1\nmodel m { source = timm(\"x\", ) ",          # end of file inside a block
    "evc 1\nmodel m { keep = 2/ }",                      # half a fraction
    "evc 1\nmodel m { a = 1 b = 2 }",                    # no separator
    "evc 1\nmodel m { a = \"open }\n",                   # unterminated string
    "evc 1\nmodel m { a = [1, 2\n, 3] ; }",              # a stray character
]


def test_generated_from_this_grammar():
    assert _parser.GRAMMAR_SHA256 == generate.grammar_digest(), (
        "evc/spec/_parser.py was generated from another evc.lark: run `.venv/bin/python -m evc.spec.generate`")


@pytest.fixture(scope="module")
def parsers():
    return _parser.Lark_StandAlone(), lark.Lark(generate.GRAMMAR.read_text(), **generate.OPTIONS)


def _spans(tree):
    return [(t.data, t.meta.line, t.meta.column, t.meta.end_line, t.meta.end_column) for t in tree.iter_subtrees()]


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_same_tree_and_spans_as_lark(parsers, path):
    ours, theirs = (p.parse(path.read_text()) for p in parsers)
    assert ours.pretty() == theirs.pretty()
    assert _spans(ours) == _spans(theirs)


@pytest.mark.parametrize("text", MALFORMED)
def test_same_error_as_lark(parsers, text):
    errors = []
    for parser in parsers:
        with pytest.raises(Exception) as caught:
            parser.parse(text)
        e = caught.value
        errors.append((type(e).__name__, e.line, e.column, sorted(getattr(e, "expected", None) or ())))
    assert errors[0] == errors[1]


def test_check_imports_neither_lark_nor_regex():
    code = "import sys; from evc.spec.check import parse_and_check; print(sorted({'lark', 'regex'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
