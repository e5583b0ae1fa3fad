"""docs/models.md's families table, measured: each cell says what evc really does with that family.

A cell reads `built` or `refused: <reason>`. Every cell is run here on the family's reduced model (FAMILIES
in tests/passes/conftest.py, 32×32), so the table cannot rot: a family added to FAMILIES fails here until
the table has its row, and a cell that stops being true fails by name. The onnx and tflite cells of the
families test_families.py already prunes and lowers with the same checks (its BROUGHT) are not run twice:
they must read built, and test_families.py fails where they are not.
"""

import itertools
import re

import numpy as np
import pytest

from evc.errors import EvcError, SpecError
from evc.passes.block_skip import BlockSkip
from evc.passes.ffn_prune import FfnPrune, width
from evc.passes.head_prune import HeadPrune
from evc.passes.patch_slim import PatchSlim
from evc.passes.token_merge import TokenMerge
from evc.registry import FORMATS, PASSES, load_plugins
from evc.targets.onnx import Onnx, export_onnx
from evc.targets.tflite import Tflite, convert
from tests.conftest import ROOT
from tests.passes.conftest import FAMILIES, Ctx, images, outputs, program_of
from tests.passes.test_families import BROUGHT  # pruned, exported and converted there with the same checks

DOC = ROOT / "docs" / "models.md"
MARKER = "<!-- families table: each cell is measured by tests/passes/test_models_doc.py -->"
# evc's passes and formats the table leaves out, and why.
NOT_COLUMNS = {"finetune": "retrains weights, changes no structure", "bpu": "int8 on a board, not lowered here",
               "decompose": "makes N models of one, each pruned by head_prune and ffn_prune: test_decompose.py",
               "pte": "lowered on a reduced DeiT-Tiny and EfficientFormer-L1 by tests/targets/test_pte.py, not yet "
                      "per family",
               "vela": "lowered on a reduced DeiT-Tiny, EfficientFormer-L1 and EfficientFormerV2 by "
                       "tests/targets/test_ethos_u.py, not yet per family"}


class _Ctx(Ctx):
    """The test Ctx, but its errors carry their message as the driver's do: a refusal's reason is checked."""

    def error(self, key, message):
        return SpecError.at("models.evc", "", None, f"{key}: {message}")


def _run(compress, program, **params):
    return compress().run(program, params, _Ctx(params, images()))


def head_prune(program):
    after = _run(HeadPrune, program, keep=0.5, score="l1", scope="layer", min_heads=1, data=None)
    assert all(a.attn.num_heads < b.attn.num_heads for a, b in zip(after.structure.blocks, program.structure.blocks))
    return after


def ffn_prune(program):
    after = _run(FfnPrune, program, keep=0.5, score="l1", round_to=8, data=None)
    halved = [width(0.5, b.mlp.hidden, 8) for b in program.structure.blocks]
    assert [a.mlp.hidden for a in after.structure.blocks] == halved
    return after


def block_skip(program):
    last = program.structure.depth - 1
    after = _run(BlockSkip, program, attn=(0,), mlp=(1,), blocks=(last,), count=None, part="attn",
                 score="residual", data=None)
    blocks = after.structure.blocks
    assert len(blocks) == last and blocks[0].attn is None and blocks[1].mlp is None
    return after


def patch_slim(program):
    score = "cls_attention" if program.structure.prefix_tokens else "mean_attention"
    keep = [1] + [0.5] * (program.structure.depth - 1)
    after = _run(PatchSlim, program, keep=keep, score=score, fuse=False, search=None)
    tokens = [b.tokens for b in after.structure.blocks]
    assert tokens == sorted(tokens, reverse=True) and tokens[1] < tokens[0]
    return after


def token_merge(program):
    after = _run(TokenMerge, program, r=2, proportional=True)
    tokens = [b.tokens for b in after.structure.blocks]
    assert tokens == sorted(tokens, reverse=True) and tokens[1] < tokens[0]  # until too few are left to merge
    return after


def compressed(family):
    """The family after head_prune and ffn_prune, each where its cell says built: what the formats lower."""
    program, row = program_of(family), table()[family]
    for name in ("head_prune", "ffn_prune"):
        if row[name] == "built":
            program = PASSES_MEASURED[name](program)
    return program


def onnx(family, folder):
    program = compressed(family)
    export_onnx(program, folder / "model.onnx", 17)
    return program, Onnx().session(folder / "model.onnx", 1)


def tflite(family, folder):
    program = compressed(family)
    (folder / "model.tflite").write_bytes(convert(program))
    return program, Tflite().session(folder / "model.tflite", 1)


PASSES_MEASURED = {"head_prune": head_prune, "ffn_prune": ffn_prune, "block_skip": block_skip,
                   "patch_slim": patch_slim, "token_merge": token_merge}
FORMATS_MEASURED = {"onnx": onnx, "tflite": tflite}
COLUMNS = [*PASSES_MEASURED, *FORMATS_MEASURED]


def table() -> dict[str, dict[str, str]]:
    """The table after MARKER in docs/models.md: family -> column -> cell."""
    text = DOC.read_text()
    assert MARKER in text, f"{DOC} lost its marker line {MARKER}"
    lines = itertools.takewhile(lambda line: line.startswith("|"), text.split(MARKER, 1)[1].strip().splitlines())
    rows = [[cell.strip().strip("`") for cell in line.strip().strip("|").split("|")] for line in lines]
    header, body = rows[0], rows[2:]
    return {row[0]: dict(zip(header[1:], row[1:])) for row in body}


def cell(family: str, column: str) -> str:
    row = table().get(family)
    assert row is not None, f"{DOC} has no row for family {family!r}: add one, measured by this test"
    return row[column]


def test_the_table_has_a_row_per_family_and_a_column_per_pass_and_format():
    rows = table()
    assert sorted(rows) == sorted(FAMILIES)
    assert all(list(row)[-len(COLUMNS):] == COLUMNS for row in rows.values())
    load_plugins()
    assert set(PASSES) | set(FORMATS) == set(COLUMNS) | set(NOT_COLUMNS)


@pytest.mark.parametrize("column", list(PASSES_MEASURED))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_pass_cell_says_what_the_pass_does_to_the_family(family, column):
    said = cell(family, column)
    if said == "built":
        program = program_of(family)
        after = PASSES_MEASURED[column](program)
        assert outputs(after).shape == outputs(program).shape
    else:
        assert said.startswith("refused: "), f"{family}, {column}: a cell is built or refused: <reason>"
        with pytest.raises(EvcError) as refusal:
            PASSES_MEASURED[column](program_of(family))
        assert said.removeprefix("refused: ") in str(refusal.value)


@pytest.mark.slow
@pytest.mark.parametrize("column", list(FORMATS_MEASURED))
@pytest.mark.parametrize("family", [family for family in FAMILIES if family not in BROUGHT])
def test_each_format_cell_says_whether_the_compressed_family_lowers_with_parity(family, column, tmp_path):
    said, x = cell(family, column), images(1)
    if said == "built":
        program, run = FORMATS_MEASURED[column](family, tmp_path)
        np.testing.assert_allclose(run(x), outputs(program, x), atol=1e-4)
    else:
        assert said.startswith("refused: "), f"{family}, {column}: a cell is built or refused: <reason>"
        with pytest.raises(Exception) as refusal:  # evc reports a lowering's own error as a BuildError
            FORMATS_MEASURED[column](family, tmp_path)
        assert said.removeprefix("refused: ") in str(refusal.value)


@pytest.mark.parametrize("family", BROUGHT)
def test_the_families_test_families_py_lowers_are_built_in_the_format_columns(family):
    assert [cell(family, column) for column in FORMATS_MEASURED] == ["built"] * len(FORMATS_MEASURED)


def test_every_test_the_doc_cites_exists():
    cited = re.findall(r"(tests/[\w/]+\.py)::(\w+)", DOC.read_text())
    assert cited
    for path, name in cited:
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{path}::{name} is gone"
