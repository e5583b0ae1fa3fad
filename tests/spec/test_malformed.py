"""Every file in tests/specs/malformed is a wrong spec whose last line states
the error it must get: `# expect LINE:COL: message`.

No real pass takes a table yet, so the `table_*.evc` specs use `table_probe`,
a pass registered here for each test with one Record parameter, `search`."""

import re
from pathlib import Path

import pytest

from evc.errors import SpecError
from evc.spec.check import parse_and_check
from evc.spec.params import DataRef, Float, Int, Param, Record

MALFORMED = sorted((Path(__file__).parent.parent / "specs" / "malformed").glob("*.evc"))
EXPECT = re.compile(r"# expect (\d+):(\d+): (.+)$")


def expectation(path: Path):
    match = EXPECT.search(path.read_text().rstrip().splitlines()[-1])
    assert match, f"{path.name} has no `# expect LINE:COL: message` last line"
    return int(match[1]), int(match[2]), match[3]


@pytest.fixture(autouse=True)
def table_probe(registered_pass):
    search = Record((
        Param("tolerance", Float(0, open_low=True), 0.01, "accuracy drop allowed"),
        Param("step", Int(1), 8, "tokens removed per step"),
        Param("data", DataRef(), help="images to measure on"),
    ))
    registered_pass("table_probe", lambda program, params, ctx: program, Param("search", search, None))


def test_the_corpus_has_at_least_25_specs():
    assert len(MALFORMED) >= 25


@pytest.mark.parametrize("path", MALFORMED, ids=lambda p: p.stem)
def test_malformed_spec_reports_its_line_column_and_message(path):
    line, col, message = expectation(path)
    with pytest.raises(SpecError) as caught:
        parse_and_check(path.read_text(), path)
    first = caught.value.diagnostics[0]
    assert (first.span.line, first.span.col) == (line, col), first.message
    assert message in first.message or message in f"{first.message} {first.hint}"


@pytest.mark.parametrize("path", MALFORMED, ids=lambda p: p.stem)
def test_malformed_spec_renders_path_line_col_and_a_caret(path):
    line, col, _ = expectation(path)
    with pytest.raises(SpecError) as caught:
        parse_and_check(path.read_text(), path)
    text = caught.value.render()
    assert text.startswith(f"{path}:{line}:{col}: error: ")
    caret_line = text.splitlines()[3]
    assert caret_line.index("^") == len(f"{line} | ") + col - 1
