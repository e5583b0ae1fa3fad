from evc.tools.reference import BEGIN, END, reference
from tests.conftest import ROOT


def test_readme_key_tables_match_the_declarations():
    text = (ROOT / "README.md").read_text()
    generated = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip()
    assert generated == reference().strip(), "run: python -m evc.tools.reference README.md"


def test_a_record_parameter_lists_its_keys_as_dotted_rows(registered_pass):
    from evc.spec.params import Int, Param, Record

    search = Record((Param("step", Int(1), 8, "tokens per step"),))
    registered_pass("slim_x", lambda p, params, ctx: p, Param("search", search, None, "how to search"))
    lines = reference().splitlines()
    row = lines.index("| `search` | a table of the keys below | none | how to search |")
    assert lines[row + 1] == "| `search.step` | an integer >= 1 | 8 | tokens per step |"


def test_a_pass_heading_names_the_passes_it_excludes(registered_pass):
    registered_pass("slim_x", lambda p, params, ctx: p, excludes={"merge_x": "both change the token count"})
    lines = reference().splitlines()
    heading = next(i for i, line in enumerate(lines) if line.startswith("#### `slim_x`"))
    assert lines[heading + 1:heading + 3] == ["Cannot be combined with `merge_x` (both change the token count).", ""]
