"""The transformers no issue named (tests/zoo.py) through every pass, and docs/models.md's table of them.

Each cell of the table is what the pass does to the small model, run as a
build runs it: the share of MACs it removes, "as is" where it found nothing
of its kind and said so, "refused" with the error's reason, or "internal
error" where a cut failed its check. `python -m tests.passes.test_zoo`
prints the table; a slow test recomputes every cell and compares.
"""

import functools
import re
import sys

import numpy as np
import pytest
import torch

from evc.errors import EvcError, PassFailure
from evc.ir.groups import channel_groups
from evc.ir.macs import summarize
from evc.ir.program import Program
from evc.ir.prunable import candidates
from evc.passes.surgery.groups import keep_groups, zero_groups
from evc.registry import PASSES, load_plugins
from evc.spec.plan import ImageInput
from evc.targets.onnx import export_onnx
from tests.conftest import ROOT
from tests.zoo import ZOO, params

DOC = ROOT / "docs" / "models.md"
MARKER = "<!-- zoo table: measured by tests/passes/test_zoo.py -->"
PASS_PARAMS = {  # each as a spec would write it
    "head_prune": dict(keep=0.5),
    "ffn_prune": dict(keep=0.5),
    "block_skip": dict(count=1, part="mlp", data="calib"),
    "patch_slim": dict(keep=0.5, score="mean_attention"),
    "token_merge": dict(r=2),
}


class Ctx:
    """A PassContext as the build gives one: one value for every layer, images, warnings kept."""

    def __init__(self, params, images):
        self.params, self._images, self.warnings, self.found = params, images, [], {}

    def per_layer(self, key, depth):
        return (self.params[key],) * depth

    def images(self, name):
        return self._images

    def warn(self, message):
        self.warnings.append(message)

    def report(self, key, value):
        self.found[key] = value

    def error(self, key, message):
        return EvcError(message)


@functools.cache
def loaded(name: str) -> Program:
    model, size, output = ZOO[name]()
    return Program.from_module(model, ImageInput(size, size), output=output)


def run(program: Program, pass_name: str) -> tuple[Program | None, str | None]:
    """The pass's result, and its last warning; or None and why it refused."""
    load_plugins()
    info = PASSES[pass_name]
    params = {**{p.name: p.default for p in info.params}, **PASS_PARAMS[pass_name]}
    images = np.random.default_rng(0).standard_normal((2, *program.example().shape[1:])).astype(np.float32)
    ctx = Ctx(params, images)
    try:
        return info.plugin.run(program, params, ctx), (ctx.warnings[-1] if ctx.warnings else None)
    except PassFailure as e:
        return None, f"internal error: {e}"
    except EvcError as e:
        return None, f"refused: {e}"


def macs(program: Program) -> int:
    return summarize(program.graph, None, program.example()).total.macs


@functools.cache
def row(name: str) -> tuple[str, ...]:
    """The model's cells: each pass alone (the two token passes in one cell when they say the same), then
    head_prune and ffn_prune together."""
    program = loaded(name)
    before = macs(program)
    cells = {}
    for pass_name in PASS_PARAMS:
        after, said = run(program, pass_name)
        if after is None:
            cells[pass_name] = _short(said)
        elif after is program:
            cells[pass_name] = f"as is: {_short(said)}" if said else "as is"
        else:
            cells[pass_name] = f"−{100 * (1 - macs(after) / before):.0f}%"
    slim, merge = cells.pop("patch_slim"), cells.pop("token_merge")
    tokens = slim if slim == merge else f"{slim} / {merge}"
    heads = run(program, "head_prune")[0]
    both = heads and run(heads, "ffn_prune")[0]
    cut = f"−{100 * (1 - macs(both) / before):.0f}%" if both is not None else "—"
    return (name, "yes" if program.structure is not None else "no", *cells.values(), tokens, cut)


def _short(message: str) -> str:
    """The reason in a table cell: without the pass's name and what every refusal of its kind repeats."""
    message = re.sub(r"(: )?pass \w+:? ", r"\1", message.splitlines()[0])
    for said in ("cannot change this model's token count: ", "cannot drop patches: ", "cannot merge tokens: ",
                 "the graph has no attention heads to remove; the model is left as it is"):
        message = message.replace(said, "no attention heads in the graph" if said.startswith("the graph") else "")
    message = message.replace("|", "/")
    return message[:90] + ("…" if len(message) > 90 else "")


HEADER = ("model", "recognised", "head_prune", "ffn_prune", "block_skip", "patch_slim / token_merge",
          "head + ffn at 0.5")


def table() -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row(name)) + " |" for name in ZOO]
    return "\n".join(lines)


def documented() -> str:
    text = DOC.read_text()
    start = text.index(MARKER) + len(MARKER)
    return text[start:].strip().split("\n\n")[0]


FAST = {"parallel_vit", "poolformerv2", "siglip"}  # parallel blocks, a MetaFormer, an attention pool: the rest
SLOW = frozenset(ZOO) - FAST                        # in the full run


@pytest.mark.parametrize("name", params(slow=SLOW))
def test_cutting_half_of_each_head_and_unit_group_equals_zeroing_them_first(name):
    import copy

    program = loaded(name)
    groups = channel_groups(program.graph)
    cuts = [(g, list(range(0, g.width, 2))) for kind in ("heads", "units")
            for g in candidates(program.graph, kind, groups)]
    assert cuts
    cut, zeroed = copy.deepcopy(program.graph), copy.deepcopy(program.graph)
    keep_groups(cut, cuts)
    zero_groups(zeroed, cuts)
    x = torch.randn((2, *program.example().shape[1:]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(cut(x), zeroed(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", params(slow=SLOW))
def test_keep_one_leaves_the_model_as_it_was(name):
    program = loaded(name)
    for pass_name in ("head_prune", "ffn_prune"):
        params_ = {**{p.name: p.default for p in PASSES[pass_name].params}, "keep": 1.0}
        assert PASSES[pass_name].plugin.run(program, params_, Ctx(params_, None)) is program


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_head_and_ffn_prune_at_half_export_to_onnx_with_parity(name, tmp_path):
    heads, _ = run(loaded(name), "head_prune")
    both, _ = run(heads, "ffn_prune")
    export_onnx(both, tmp_path / "m.onnx", 17)
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal(tuple(both.example().shape)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(got, both.run(x).numpy(), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_the_zoo_table_in_docs_models_md_is_what_the_passes_do():
    documented_rows = {line.split(" | ")[0].strip("| "): line for line in documented().splitlines()[2:]}
    assert set(documented_rows) == set(ZOO)
    for name in ZOO:
        assert documented_rows[name] == "| " + " | ".join(row(name)) + " |"


@pytest.mark.slow
def test_every_zoo_model_compresses_with_no_crash_and_the_goal_is_met_on_most():
    cuts = {name: row(name)[-1] for name in ZOO}
    assert "—" not in cuts.values()  # head_prune then ffn_prune never fail
    assert not [cell for name in ZOO for cell in row(name) if cell.startswith("internal error")]
    met = [name for name, cut in cuts.items() if int(cut.strip("−%")) >= 25]
    assert len(met) >= 20, cuts


if __name__ == "__main__":
    sys.stdout.write(table() + "\n")
