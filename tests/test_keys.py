"""evc.keys: every stage's key from what that stage reads, so a change re-runs that stage and those below it."""

from evc.keys import derive
from evc.spec.check import parse_and_check
from tests.conftest import small_spec

CPU = "target cpu { device = cpu, format = onnx }"
PHONE = "target phone { device = android, format = tflite }"
DATA = "data calib { synthetic = 4 }\ndata other { synthetic = 8 }\n"


def keys_of(tmp_path, heads="0.5", ffn="0.5", opset="17", data="calib", comment=""):
    compress = (f"compress {{\n    head_prune {{ keep = {heads} }}\n"
                f"    ffn_prune {{ keep = {ffn}, score = activation, data = {data} }}\n}}\n")
    targets = CPU.replace("onnx }", f"onnx, opset = {opset} }}") + "\n" + PHONE
    text = comment + small_spec(targets, extra=DATA + compress)
    return derive(parse_and_check(text, tmp_path / "k.evc"))


def test_an_unchanged_spec_derives_the_same_keys_and_a_comment_changes_none(tmp_path):
    assert keys_of(tmp_path) == keys_of(tmp_path) == keys_of(tmp_path, comment="# a note\n")


def test_a_later_pass_changing_keeps_the_load_and_earlier_pass_keys(tmp_path):
    base, changed = keys_of(tmp_path), keys_of(tmp_path, ffn="0.25")
    assert changed.load == base.load and changed.passes[0] == base.passes[0]
    assert changed.passes[1] != base.passes[1] and changed.program != base.program
    assert all(changed.lower[t] != base.lower[t] and changed.bundle[t] != base.bundle[t] for t in ("cpu", "phone"))


def test_an_earlier_pass_changing_changes_every_pass_after_it(tmp_path):
    base, changed = keys_of(tmp_path), keys_of(tmp_path, heads="0.75")
    assert changed.load == base.load
    assert changed.passes[0] != base.passes[0] and changed.passes[1] != base.passes[1]


def test_the_data_a_pass_reads_is_part_of_its_key(tmp_path):
    base, changed = keys_of(tmp_path), keys_of(tmp_path, data="other")
    assert changed.passes[0] == base.passes[0] and changed.passes[1] != base.passes[1]


def test_one_target_changing_changes_only_that_targets_keys(tmp_path):
    base, changed = keys_of(tmp_path), keys_of(tmp_path, opset="13")
    assert changed.program == base.program
    assert changed.lower["cpu"] != base.lower["cpu"] and changed.bundle["cpu"] != base.bundle["cpu"]
    assert changed.lower["phone"] == base.lower["phone"] and changed.bundle["phone"] == base.bundle["phone"]


def test_weights_change_the_load_key_and_so_every_key(tmp_path):
    base = keys_of(tmp_path)
    (tmp_path / "w.pth").write_bytes(b"weights")
    text = small_spec(CPU, model_extra='    weights = "w.pth"\n')
    weighted = derive(parse_and_check(text, tmp_path / "k.evc"))
    assert weighted.weights != "random" and base.weights == "random"
    assert weighted.load != base.load
