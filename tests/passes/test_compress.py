"""The passes stage: passes run in order on the Program, change it for real, and are cached."""

import copy

import pytest
import torch

from evc.cache import Cache
from evc.driver import build, compile_model
from evc.progress import Progress
from evc.spec.check import parse_and_check
from evc.spec.params import Float, Int, Param
from evc.tools.explain import explain
from tests.conftest import small_spec

CALLS = []


def drop_mlp(program, params, ctx):
    """A real structural pass: remove one block's MLP sublayer, keeping the residual path."""
    CALLS.append(("drop_mlp", params["block"]))
    block = program.structure.blocks[params["block"]]
    graph = copy.deepcopy(program.graph)
    add = next(n for n in graph.graph.nodes if n.name == block.nodes[-1])
    add.replace_all_uses_with(add.args[0])
    graph.graph.eliminate_dead_code()
    graph.delete_all_unused_submodules()
    return program.rebuilt(graph)


def scale_head(program, params, ctx):
    CALLS.append(("scale_head", params["by"]))
    graph = copy.deepcopy(program.graph)
    with torch.no_grad():
        graph.get_submodule(program.structure.head[0]).bias.add_(1.0).mul_(params["by"])
    return program.rebuilt(graph)


@pytest.fixture
def passes(registered_pass):
    CALLS.clear()
    registered_pass("drop_mlp", drop_mlp, Param("block", Int(0), 0, "which block"))
    registered_pass("scale_head", scale_head, Param("by", Float(), 1.0, "factor"))


def spec_with(compress: str) -> str:
    return small_spec(extra=f"compress {{\n{compress}\n}}\n")


def test_passes_run_in_the_order_written_and_repeat(passes, write_spec, tmp_path):
    spec = write_spec(spec_with("    scale_head { by = 2 }\n    drop_mlp { block = 1 }\n    scale_head { by = 3 }"))
    plan = parse_and_check(spec.read_text(), spec)
    compiled = compile_model(plan, Cache(tmp_path / "cache"), Progress())
    assert CALLS == [("scale_head", 2.0), ("drop_mlp", 1), ("scale_head", 3.0)]
    head = compiled.program.graph.get_submodule(compiled.program.structure.head[0])
    assert torch.allclose(head.bias, torch.full_like(head.bias, 9.0))  # ((0 + 1) * 2 + 1) * 3


def test_a_structural_pass_shrinks_params_and_macs_where_it_acts(passes, write_spec, tmp_path):
    spec = write_spec(spec_with("    drop_mlp { block = 1 }"))
    (result,) = build(parse_and_check(spec.read_text(), spec), tmp_path / "out")
    before, after = result.manifest["params_macs"]["before"], result.manifest["params_macs"]["after"]
    assert result.manifest["structure"]["blocks"][1]["mlp"] is None
    assert after["blocks"][0] == before["blocks"][0]
    mlp_params = 2 * 192 * 768 + 768 + 192 + 2 * 192  # fc1, fc2 and the norm before them
    assert before["blocks"][1]["params"] - after["blocks"][1]["params"] == mlp_params
    assert before["total"]["macs"] - after["total"]["macs"] == 17 * 2 * 192 * 768  # 17 tokens through fc1, fc2
    assert result.manifest["passes"] == [{"name": "drop_mlp", "params": {"block": 1}}]
    assert result.manifest["artifacts"][0]["parity"]["max_abs_diff"] < 1e-4


def test_the_compressed_program_is_cached_and_reloaded_without_rerunning_passes(passes, write_spec, tmp_path):
    spec = write_spec(spec_with("    drop_mlp { block = 0 }"))
    plan = parse_and_check(spec.read_text(), spec)
    cache = Cache(tmp_path / "cache")
    first = compile_model(plan, cache, Progress())
    CALLS.clear()
    again = compile_model(plan, cache, Progress())
    assert CALLS == []
    assert again.program.structure == first.program.structure
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again.program.run(x), first.program.run(x))


def test_changing_a_pass_reuses_the_loaded_model_but_reruns_the_passes(passes, write_spec, tmp_path):
    cache = Cache(tmp_path / "cache")
    for block in (0, 1):
        spec = write_spec(spec_with(f"    drop_mlp {{ block = {block} }}"))
        compile_model(parse_and_check(spec.read_text(), spec), cache, Progress())
    assert CALLS == [("drop_mlp", 0), ("drop_mlp", 1)]
    # one loaded model, two compressed ones
    assert len(list((tmp_path / "cache" / "program").iterdir())) == 3


def test_explain_shows_each_block_before_and_after(passes, write_spec, tmp_path):
    from rich.console import Console

    spec = write_spec(spec_with("    drop_mlp { block = 1 }"))
    console = Console(record=True, width=200)
    explain(parse_and_check(spec.read_text(), spec), tmp_path / "out", console)
    text = console.export_text()
    assert "pass drop_mlp { block = 1 }: A real structural pass" in text
    assert "768 → 0" in text and "0.44 M → 0.15 M" in text
    assert not (tmp_path / "out").exists()
