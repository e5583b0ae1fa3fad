"""A misspelt block or key is reported once, as the root cause: what follows from its absence is not."""

from evc.errors import SpecError
from evc.spec.check import parse_and_check
from tests.conftest import small_spec

PASS = "data calib {{ synthetic = 8 }}\ncompress {{\n    head_prune {{ {entries} }}\n}}\n"


def messages(text: str, tmp_path) -> list[str]:
    path = tmp_path / "s.evc"
    path.write_text(text)
    try:
        parse_and_check(text, path)
    except SpecError as e:
        return [d.message + (f" ({d.hint})" if d.hint else "") for d in e.diagnostics]
    return []


def test_a_misspelt_model_block_is_the_only_error(tmp_path):
    assert messages(small_spec().replace("model small", "modle small"), tmp_path) == [
        "unknown block 'modle' (did you mean 'model'?)"]


def test_a_misspelt_pass_key_is_the_only_error(tmp_path):
    found = messages(small_spec(extra=PASS.format(entries="kep = 0.5")), tmp_path)
    assert found == ["unknown key 'kep' in pass 'head_prune' (did you mean 'keep'?)"]


def test_a_misspelt_data_block_hides_the_undefined_data_its_users_name(tmp_path):
    text = small_spec(extra=PASS.format(entries="keep = 0.5, score = taylor, data = calib")).replace("data calib",
                                                                                                   "dta calib")
    assert messages(text, tmp_path) == ["unknown block 'dta' (did you mean 'data'?)"]


def test_a_misspelt_target_block_or_device_key_is_the_only_error(tmp_path):
    assert messages(small_spec(targets="targte cpu { device = cpu, format = onnx }"), tmp_path) == [
        "unknown block 'targte' (did you mean 'target'?)"]
    assert messages(small_spec(targets="target cpu { devcie = cpu, format = onnx }"), tmp_path) == [
        "unknown key 'devcie' in target 'cpu' (did you mean 'device'?)"]


def test_without_a_misspelling_the_absence_is_still_reported(tmp_path):
    """The suppression is tied to the misspelling: a block or key that is simply missing is the root cause."""
    assert "the spec has no model block" in messages(small_spec().replace("model small", "data small"), tmp_path)
    found = messages(small_spec(extra=PASS.format(entries="score = l1, extent = 2")), tmp_path)
    assert "unknown key 'extent' in pass 'head_prune'" in found
    assert any(m.startswith("pass 'head_prune' is missing required key 'keep'") for m in found)
    assert messages(small_spec(targets="target cpu { format = onnx }"), tmp_path)[0].startswith(
        "target 'cpu' is missing required key 'device'")
