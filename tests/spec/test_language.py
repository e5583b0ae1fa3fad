"""The .evc language: values, blocks, the contract spec, and what `evc check` reports."""

import subprocess
import sys
from fractions import Fraction

import pytest

from evc.errors import SpecError
from evc.spec import ast, parse_spec
from evc.spec.check import parse_and_check
from evc.spec.params import Param, PerLayer, Ratio
from tests.conftest import ROOT, SPECS, run_evc

MINIMAL = """evc 1
model m {
    source = timm("deit_tiny_patch16_224")
    input = image(224, 224)
}
target cpu { device = cpu, format = onnx }
"""


def entry_values(text):
    spec = parse_spec("evc 1\nmodel m {\n" + text + "\n}\n", "t.evc")
    return {e.key: e.value for e in spec.blocks[0].entries}


def test_every_kind_of_value_parses_to_its_ast_node():
    values = entry_values(
        'i = 3, f = -0.25, e = 1e-4, r = 2/3, p = 70%, s = "a b", n = l1\n'
        'l = [1, 2.5,\n     3]\n'
        'c = timm("deit", num_classes = 10)'
    )
    assert values["i"] == ast.Number(3, values["i"].span)
    assert values["f"].value == -0.25 and values["e"].value == 1e-4
    assert values["r"].value == Fraction(2, 3)
    assert values["p"].value == 70.0
    assert values["s"].value == "a b"
    assert values["n"].name == "l1"
    assert [v.value for v in values["l"].items] == [1, 2.5, 3]
    call = values["c"]
    assert (call.name, call.args[0].value, call.kwargs[0].name, call.kwargs[0].value.value) == (
        "timm", "deit", "num_classes", 10)


def test_spans_point_at_the_value_in_the_file():
    values = entry_values("    keep = 2/3")
    assert (values["keep"].span.line, values["keep"].span.col) == (3, 12)


def test_comments_and_blank_lines_are_ignored_anywhere():
    text = "# header\n\nevc 1   # version\n\n# a model\nmodel m {  # opens\n\n    source = timm(\"x\") # the source\n\n}\n# end\n"
    spec = parse_spec(text, "t.evc")
    assert spec.blocks[0].entries[0].value.name == "timm"


def test_entries_need_a_separator():
    with pytest.raises(SpecError) as caught:
        parse_spec('evc 1\nmodel m { a = 1 b = 2 }\n', "t.evc")
    assert caught.value.diagnostics[0].span.col == 17


def test_the_contract_spec_parses_as_written():
    spec = parse_spec((SPECS / "contract.evc").read_text(), "contract.evc")
    kinds = [(b.kind, b.name) for b in spec.blocks]
    assert kinds == [("model", "deit_tiny"), ("data", "calib"), ("compress", None), ("target", "cpu"),
                     ("target", "x5")]
    compress = spec.blocks[2]
    assert [p.kind for p in compress.nested] == ["head_prune", "ffn_prune"]
    assert compress.nested[0].entries[0].value.value == Fraction(2, 3)
    assert compress.nested[1].entries[0].value.value == 70.0


def test_the_contract_checks_clean_with_its_x5_target():
    plan = parse_and_check((SPECS / "contract.evc").read_text(), "contract.evc")
    x5 = plan.targets[1]
    assert (x5.name, x5.device, x5.format) == ("x5", "rdk_x5", "bpu")
    assert (x5.params["quantize"], x5.params["calibrate"]) == ("int8", "calib")
    assert x5.params["threads"] == (1, 4) and x5.params["frame_count"] == 200  # declared defaults


def test_the_readme_spec_checks_into_a_plan():
    plan = parse_and_check((ROOT / "specs" / "deit_tiny_x5.evc").read_text(), ROOT / "specs" / "deit_tiny_x5.evc")
    assert plan.model.source.kind == "timm" and plan.model.source.name == "deit_tiny_patch16_224"
    assert (plan.model.input.height, plan.model.input.width) == (224, 224)
    assert plan.model.input.crop_pct is None  # not in the spec: the model's own, resolved at load
    assert plan.model.input.std == (0.229, 0.224, 0.225)
    assert plan.data["calib"].synthetic == 64
    assert [(p.name, p.params["keep"], p.params["score"]) for p in plan.passes] == [
        ("head_prune", 2 / 3, "l1"), ("ffn_prune", 0.7, "l1")]
    cpu, x5 = plan.targets
    assert (cpu.device, cpu.format) == ("cpu", "onnx")
    assert (x5.device, x5.format, x5.params["quantize"], x5.params["calibrate"]) == ("rdk_x5", "bpu", "int8", "calib")
    assert cpu.params["threads"] == (1, "all") and cpu.params["opset"] == 17  # declared defaults


def test_all_errors_of_a_spec_are_reported_in_source_order():
    text = MINIMAL.replace("device = cpu", "device = cpu, runs = 0, warmups = -1") + "bogus b {\n}\n"
    with pytest.raises(SpecError) as caught:
        parse_and_check(text, "t.evc")
    assert [d.span.line for d in caught.value.diagnostics] == [6, 6, 7]


def test_passes_keep_their_order_and_may_repeat(registered_pass):
    registered_pass("scale_a", lambda p, params, ctx: p, Param("by", Ratio(), 1.0, "share"))
    registered_pass("scale_b", lambda p, params, ctx: p)
    text = MINIMAL + "compress {\n    scale_a { by = 50% }\n    scale_b {}\n    scale_a { by = 1/4 }\n}\n"
    plan = parse_and_check(text, "t.evc")
    assert [(p.name, p.params) for p in plan.passes] == [
        ("scale_a", {"by": 0.5}), ("scale_b", {}), ("scale_a", {"by": 0.25})]


@pytest.mark.parametrize("keep", ["0", "1.5", "0%", "101%", "3/2", "-0.5"])
def test_keep_outside_zero_to_one_is_an_error(registered_pass, keep):
    registered_pass("prune_x", lambda p, params, ctx: p, Param("keep", Ratio(), 1.0, "share to keep"))
    with pytest.raises(SpecError) as caught:
        parse_and_check(MINIMAL + f"compress {{\n    prune_x {{ keep = {keep} }}\n}}\n", "t.evc")
    (d,) = caught.value.diagnostics
    assert (d.span.line, d.span.col) == (8, 22)
    assert "out of range: expected a fraction in (0, 1]" in d.message


@pytest.mark.parametrize("keep, value", [("1", 1.0), ("2/3", 2 / 3), ("70%", 0.7), ("0.25", 0.25)])
def test_keep_accepts_numbers_fractions_and_percentages(registered_pass, keep, value):
    registered_pass("prune_x", lambda p, params, ctx: p, Param("keep", Ratio(), 1.0, "share to keep"))
    plan = parse_and_check(MINIMAL + f"compress {{\n    prune_x {{ keep = {keep} }}\n}}\n", "t.evc")
    assert plan.passes[0].params["keep"] == pytest.approx(value)


def test_a_per_layer_list_keeps_its_span_until_the_depth_is_known(registered_pass):
    registered_pass("prune_x", lambda p, params, ctx: p,
                    Param("keep", Ratio(), 1.0, "share to keep", per_layer=True))
    plan = parse_and_check(MINIMAL + "compress {\n    prune_x { keep = [0.5, 1, 1] }\n}\n", "t.evc")
    keep = plan.passes[0].params["keep"]
    assert isinstance(keep, PerLayer) and keep.for_depth(3) == (0.5, 1.0, 1.0)
    from evc.context import PassContext

    with pytest.raises(SpecError) as caught:
        PassContext(plan, plan.passes[0]).per_layer("keep", 12)
    d = caught.value.diagnostics[0]
    assert (d.span.line, d.span.col) == (8, 22)
    assert "the model has depth 12, this list has 3" in d.message


def test_a_pass_can_reject_a_combination_of_values_at_check_time(registered_pass):
    from evc.spec.params import Choice, DataRef, Invalid

    def needs_data(params, spans):
        if params["score"] == "taylor" and params["data"] is None:
            raise Invalid("score = taylor needs `data = <a data block>`", spans["score"])

    registered_pass("prune_x", lambda p, params, ctx: p, Param("score", Choice(("l1", "taylor")), "l1"),
                    Param("data", DataRef(), None), check=needs_data)
    with pytest.raises(SpecError) as caught:
        parse_and_check(MINIMAL + "compress {\n    prune_x { score = taylor }\n}\n", "t.evc")
    assert caught.value.diagnostics[0].message.startswith("score = taylor needs")


def test_evc_check_does_not_import_torch():
    code = ("import sys; from evc.cli import main; "
            "assert main(['check', 'specs/deit_tiny_x5.evc']) == 0; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_cli_check_gives_exit_2_and_no_traceback_for_a_bad_spec(tmp_path):
    spec = tmp_path / "bad.evc"
    spec.write_text(MINIMAL.replace("format = onnx", "format = onxx"))
    done = run_evc("check", spec)
    assert done.returncode == 2
    assert f"{spec}:6:37: error: unknown format 'onxx'" in done.stderr
    assert "did you mean 'onnx'?" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_check_of_a_missing_file_names_it_and_exits_2(tmp_path):
    done = run_evc("check", tmp_path / "nope.evc")
    assert done.returncode == 2 and "no such spec file" in done.stderr and "Traceback" not in done.stderr


def test_cli_check_ok_exits_0():
    done = run_evc("check", ROOT / "specs" / "deit_tiny_x5.evc")
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout


def test_a_reference_to_a_data_block_with_its_own_error_is_not_undefined():
    text = MINIMAL.replace("target cpu { device = cpu, format = onnx }",
                           "data calib { synthetic = 0 }\ntarget cpu { device = cpu, format = onnx, validate = calib }")
    with pytest.raises(SpecError) as caught:
        parse_and_check(text, "t.evc")
    assert [d.message for d in caught.value.diagnostics] == ["synthetic: 0 is out of range: expected an integer >= 1"]


def test_a_table_parses_to_entries_with_their_spans():
    values = entry_values('    search = { tolerance = 0.01, step = 8, data = calib }')
    table = values["search"]
    assert isinstance(table, ast.Table) and table.describe() == "a table"
    assert [(e.key, e.span.col) for e in table.entries] == [("tolerance", 16), ("step", 34), ("data", 44)]
    assert table.entries[2].value == ast.Ident("calib", table.entries[2].value.span)
    assert (table.span.line, table.span.col, table.span.end_col) == (3, 14, 58)


def test_tables_nest_take_line_breaks_and_sit_in_lists():
    values = entry_values('t = {\n    inner = { a = [1, 2] }\n    empty = {}\n    rows = [{ b = 1 }, {}],\n}')
    inner, empty, rows = (e.value for e in values["t"].entries)
    assert inner.entries[0].key == "a" and [v.value for v in inner.entries[0].value.items] == [1, 2]
    assert empty == ast.Table((), empty.span)
    assert [len(r.entries) for r in rows.items] == [1, 0]


def test_a_pass_with_a_table_is_a_nested_block_and_the_table_an_entry():
    spec = parse_spec("evc 1\ncompress {\n    patch_slim { keep = [1, 0.7], search = { step = 8 } }\n}\n", "t.evc")
    (pass_block,) = spec.blocks[0].nested
    assert pass_block.kind == "patch_slim" and pass_block.nested == ()
    assert [e.key for e in pass_block.entries] == ["keep", "search"]
    assert isinstance(pass_block.entries[1].value, ast.Table)


def test_table_entries_need_a_separator():
    with pytest.raises(SpecError) as caught:
        parse_spec('evc 1\nmodel m { t = { a = 1 b = 2 } }\n', "t.evc")
    assert caught.value.diagnostics[0].span.col == 23


def test_a_block_inside_a_table_is_an_error_at_its_name():
    with pytest.raises(SpecError) as caught:
        parse_spec('evc 1\nmodel m {\n    t = { a = 1, inner { b = 2 } }\n}\n', "t.evc")
    (d,) = caught.value.diagnostics
    assert (d.span.line, d.span.col) == (3, 18)
    assert d.message == "a table holds `key = value` entries, not blocks such as `inner { ... }`"
    assert d.hint == "for a table inside this one, write `inner = { ... }`"


def test_a_table_in_a_model_source_call_is_a_dict_argument():
    text = MINIMAL.replace('timm("deit_tiny_patch16_224")',
                           'timm("deit_tiny_patch16_224", pretrained_cfg_overlay = { file = "w.pth", tags = [a] })')
    plan = parse_and_check(text, "t.evc")
    assert dict(plan.model.source.kwargs)["pretrained_cfg_overlay"] == {"file": "w.pth", "tags": ["a"]}


def _search_record():
    from evc.spec.params import DataRef, Int, Record

    return Record((Param("step", Int(1), 8, "tokens per step"), Param("data", DataRef(), help="images")))


def test_a_record_parameter_checks_to_a_dict_with_defaults(registered_pass):
    registered_pass("slim_x", lambda p, params, ctx: p, Param("search", _search_record(), None))
    text = MINIMAL + "data calib { synthetic = 4 }\ncompress {\n    slim_x { search = { data = calib } }\n    slim_x {}\n}\n"
    plan = parse_and_check(text, "t.evc")
    assert [p.params["search"] for p in plan.passes] == [{"step": 8, "data": "calib"}, None]


def test_undefined_data_inside_a_table_points_at_the_name(registered_pass):
    registered_pass("slim_x", lambda p, params, ctx: p, Param("search", _search_record(), None))
    text = MINIMAL + "data calib { synthetic = 4 }\ncompress {\n    slim_x { search = { data = calb } }\n}\n"
    with pytest.raises(SpecError) as caught:
        parse_and_check(text, "t.evc")
    (d,) = caught.value.diagnostics
    assert (d.message, d.span.line, d.span.col, d.hint) == ("undefined data 'calb'", 9, 32, "did you mean 'calib'?")


def _two_token_passes(registered_pass):
    registered_pass("slim_x", lambda p, params, ctx: p, excludes={"merge_x": "both change the token count"})
    registered_pass("merge_x", lambda p, params, ctx: p)


def test_a_pass_after_one_it_excludes_is_reported_at_its_name(registered_pass):
    _two_token_passes(registered_pass)
    text = MINIMAL + "compress {\n    slim_x {}\n    head_prune { keep = 0.5 }\n    merge_x {}\n}\n"
    with pytest.raises(SpecError) as caught:
        parse_and_check(text, "t.evc")
    (d,) = caught.value.diagnostics
    assert d.message == "`merge_x` cannot be combined with `slim_x` (line 8): both change the token count"
    assert (d.span.line, d.span.col) == (10, 5)


def test_exclusion_holds_whichever_pass_declares_it_and_is_reported_once(registered_pass):
    _two_token_passes(registered_pass)
    text = MINIMAL + "compress {\n    merge_x {}\n    merge_x {}\n    slim_x {}\n}\n"
    with pytest.raises(SpecError) as caught:
        parse_and_check(text, "t.evc")
    assert [(d.message, d.span.line) for d in caught.value.diagnostics] == [
        ("`slim_x` cannot be combined with `merge_x` (line 8): both change the token count", 10)]


def test_passes_that_do_not_exclude_each_other_combine(registered_pass):
    _two_token_passes(registered_pass)
    plan = parse_and_check(MINIMAL + "compress {\n    slim_x {}\n    slim_x {}\n    head_prune { keep = 0.5 }\n}\n", "t.evc")
    assert [p.name for p in plan.passes] == ["slim_x", "slim_x", "head_prune"]


def test_true_and_false_in_a_model_source_call_are_booleans():
    text = MINIMAL.replace('timm("deit_tiny_patch16_224")',
                           'timm("deit_tiny_patch16_224", class_token = false, dynamic_img_size = true, act = gelu)')
    kwargs = dict(parse_and_check(text, "t.evc").model.source.kwargs)
    assert kwargs == {"class_token": False, "dynamic_img_size": True, "act": "gelu"}
