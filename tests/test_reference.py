from evc.reference import BEGIN, END, reference
from tests.conftest import ROOT


def test_readme_key_tables_match_the_declarations():
    text = (ROOT / "README.md").read_text()
    generated = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip()
    assert generated == reference().strip(), "run: python -m evc.reference README.md"
