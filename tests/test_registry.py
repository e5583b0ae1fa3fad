"""The plug-in contract: one registration shape, checked when a plug-in registers; capabilities declared."""

import subprocess
import sys

import pytest

from evc.errors import SpecError
from evc.registry import (
    DEVICES,
    FORMATS,
    PASSES,
    Estimated,
    Export,
    Format,
    Pass,
    Placement,
    RemoteBench,
    Runtime,
    load_plugins,
    register_format,
    register_pass,
)
from evc.spec.check import parse_and_check
from evc.spec.params import DataRef, Int, Param, When
from tests.conftest import ROOT, small_spec

load_plugins()


@pytest.fixture
def cleanup():
    yield
    for name in ("not_a_pass", "half_format", "bad_rule", "twice"):
        PASSES.pop(name, None)
        FORMATS.pop(name, None)


def test_a_class_that_is_not_a_pass_cannot_register_as_one(cleanup):
    with pytest.raises(TypeError, match="registered as a pass but is not a Pass"):
        @register_pass("not_a_pass")
        class NotAPass:
            def run(self, program, params, ctx):
                return program
    assert "not_a_pass" not in PASSES


def test_a_format_missing_part_of_its_contract_fails_at_registration(cleanup):
    with pytest.raises(TypeError, match="check_parity"):
        @register_format("half_format")
        class HalfFormat(Format):
            def lower(self, program, target, out_dir, ctx):
                return []
    assert "half_format" not in FORMATS


def test_a_rule_on_a_key_the_plugin_does_not_declare_fails_at_registration(cleanup):
    with pytest.raises(TypeError, match="rule on undeclared key 'scor'"):
        @register_pass("bad_rule", Param("data", DataRef(), None, needed_when=(When("scor", ("taylor",)),)))
        class BadRule(Pass):
            def run(self, program, params, ctx):
                return program


def test_a_name_registers_once(cleanup):
    @register_pass("twice", Param("n", Int(), 1))
    class Once(Pass):
        def run(self, program, params, ctx):
            return program

    with pytest.raises(TypeError, match="'twice' is already registered"):
        register_pass("twice")(Once)


def test_capabilities_are_declared_by_the_classes_plugins_inherit():
    assert {name for name, f in FORMATS.items() if isinstance(f.plugin, Runtime)} == {"onnx", "tflite", "bpu", "vela",
                                                                                       "pte"}
    assert {name for name, f in FORMATS.items() if isinstance(f.plugin, Estimated)} == {"vela"}
    assert {name for name, f in FORMATS.items() if isinstance(f.plugin, Placement)} == {"bpu", "pte", "vela"}
    assert {name for name, f in FORMATS.items() if isinstance(f.plugin, Export)} == {"onnx", "pte"}
    assert {name for name, d in DEVICES.items() if isinstance(d.plugin, RemoteBench)} == {"android"}


def test_payload_files_are_never_imported_by_load_plugins():
    code = ("import sys; from evc.registry import load_plugins; load_plugins(); "
            "print(sorted(m for m in sys.modules if m.startswith(('evc.targets', 'evc.passes'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = eval(done.stdout)
    assert not [m for m in loaded if "payload" in m]
    assert "evc.targets.bpu" in loaded and "evc.passes.head_prune" in loaded


@pytest.mark.parametrize("entry, message", [
    # needed_when, with the value that made it needed
    ("head_prune { keep = 0.5, score = taylor }", "score = taylor needs data: add `data = <a data block>`"),
    # needed_when on two conditions
    ("block_skip { count = 1 }", "count with score = residual needs data"),
    # not_with
    ("patch_slim { keep = 0.5, search = { data = d } }", "give either `keep` or `search`, not both"),
])
def test_declared_rules_are_checked_as_spec_errors_at_their_key(entry, message, tmp_path):
    text = small_spec(extra=f"data d {{ synthetic = 2 }}\ncompress {{\n    {entry}\n}}\n")
    with pytest.raises(SpecError) as caught:
        parse_and_check(text, tmp_path / "t.evc")
    assert message in caught.value.diagnostics[0].message


def test_a_data_key_that_only_applies_to_folders_is_refused_on_synthetic_images(tmp_path):
    with pytest.raises(SpecError) as caught:
        parse_and_check(small_spec(extra="data d { synthetic = 2, skip_bad = true }\n"), tmp_path / "t.evc")
    assert caught.value.diagnostics[0].message == "skip_bad: applies only with `images`"


def test_the_readme_tables_state_each_rule_beside_its_key():
    from evc.tools.reference import reference

    text = reference()
    assert "| `data` | the name of a data block | none; needed when score = taylor |" in text
    assert "| `count` | an integer >= 1 | none; not with `attn`, `mlp`, `blocks` |" in text
    assert "| `skip_bad` | true or false | false; only with `images` |" in text


def test_the_table_is_what_the_registrations_declare():
    """evc/plugins.py, which `evc check` reads instead of importing the plug-ins, is what
    `python -m evc.registry` writes from their registrations now."""
    code = "from evc.registry import table_source; print(table_source(), end='')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout == (ROOT / "evc" / "plugins.py").read_text(), "run: python -m evc.registry"


def test_checking_a_spec_imports_only_the_plug_ins_whose_checks_it_runs(tmp_path):
    spec = tmp_path / "plain.evc"
    spec.write_text(small_spec("target phone { device = android, format = tflite }",
                               extra="compress {\n    token_merge { r = 1 }\n}\n"))
    code = ("import sys; from evc.cli import main; assert main(['check', sys.argv[1]]) == 0; "
            "print(sorted(m for m in sys.modules if m.startswith(('evc.passes.', 'evc.targets.'))))")
    done = subprocess.run([sys.executable, "-c", code, str(spec)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert eval(done.stdout.splitlines()[-1]) == []


def test_a_registration_that_differs_from_the_table_is_refused():
    code = ("from evc.registry import Pass, register_pass\n"
            "from evc.spec.params import Int, Param\n"
            "class TokenMerge(Pass):\n"
            "    def run(self, program, params, ctx): return program\n"
            "TokenMerge.__module__ = 'evc.passes.token_merge'\n"
            "register_pass('token_merge', Param('r', Int(), 1))(TokenMerge)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode != 0 and "differs from evc/plugins.py" in done.stderr
