"""Models from timm or the user's code, with the user's weights; bad inputs exit 2 with a named cause."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from evc.driver import build
from evc.errors import InputError
from evc.model.load import build_module, checkpoint_state, load_model
from evc.spec.check import parse_and_check
from evc.spec.plan import Source
from tests.conftest import ROOT, run_evc, small_spec

SMALL_KWARGS = (("img_size", 32), ("patch_size", 8), ("depth", 2), ("num_classes", 10))


def small_model(**overrides):
    kwargs = dict(SMALL_KWARGS) | overrides
    return build_module(Source("timm", "vit_tiny_patch16_224", tuple(kwargs.items())), ROOT)


def trained_state():
    """Weights unlike any random init: a distinct, reproducible checkpoint."""
    torch.manual_seed(123)
    return {k: torch.randn_like(v) * 0.05 for k, v in small_model().state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_from_a_file_are_loaded_and_recorded(write_spec, tmp_path, suffix):
    state = trained_state()
    weights = tmp_path / f"small{suffix}"
    if suffix == ".safetensors":
        save_file(state, weights)
    else:
        torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, weights)  # wrapped, DataParallel keys
    spec = write_spec(small_spec(model_extra=f'    weights = "{weights.name}"\n'))
    plan = parse_and_check(spec.read_text(), spec)
    module = load_model(plan.model, spec.parent)
    for key, value in state.items():
        assert torch.equal(module.state_dict()[key], value)
    (result,) = build(plan, tmp_path / "out")
    import hashlib

    assert result.manifest["model"]["weights"] == {
        "path": str(weights), "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}


def test_changing_the_weights_file_misses_the_cache(write_spec, tmp_path):
    weights = tmp_path / "w.safetensors"
    save_file(trained_state(), weights)
    spec = write_spec(small_spec(model_extra='    weights = "w.safetensors"\n'))
    out = tmp_path / "out"
    (first,) = build(parse_and_check(spec.read_text(), spec), out)
    save_file({k: v * 2 for k, v in trained_state().items()}, weights)
    (second,) = build(parse_and_check(spec.read_text(), spec), out)
    assert not second.cached
    assert second.manifest["artifacts"][0]["sha256"] != first.manifest["artifacts"][0]["sha256"]


def test_a_checkpoint_that_does_not_fit_names_missing_unexpected_and_misshaped_keys(tmp_path):
    state = trained_state()
    state.pop("blocks.1.mlp.fc2.bias")
    state["blocks.7.extra"] = torch.zeros(3)
    state["head.weight"] = torch.zeros(5, 192)
    path = tmp_path / "bad.safetensors"
    save_file(state, path)
    plan = parse_and_check(small_spec(model_extra=f'    weights = "{path}"\n'), tmp_path / "s.evc")
    with pytest.raises(InputError) as caught:
        load_model(plan.model, tmp_path)
    message = str(caught.value)
    assert "does not fit model 'small'" in message
    assert "missing keys: blocks.1.mlp.fc2.bias" in message
    assert "unexpected keys: blocks.7.extra" in message
    assert "mis-shaped keys: head.weight (checkpoint (5, 192), model (10, 192))" in message


def test_a_pickled_object_checkpoint_is_refused_by_weights_only_loading(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": small_model()}, path)  # a whole module: needs unpickling code to load
    with pytest.raises(InputError) as caught:
        from evc.model.load import read_checkpoint

        read_checkpoint(path)
    assert "cannot read checkpoint" in str(caught.value)


def test_checkpoint_state_unwraps_nested_state_dicts_and_strips_dataparallel_prefixes():
    tensor = torch.ones(1)
    assert checkpoint_state({"state_dict": {"module.a": tensor}}) == {"a": tensor}
    assert checkpoint_state({"model_ema": {"b": tensor}}) == {"b": tensor}
    with pytest.raises(InputError):
        checkpoint_state({"epoch": 3})


@pytest.mark.slow
def test_an_unknown_timm_model_suggests_the_closest_name(write_spec, tmp_path):
    spec = write_spec(small_spec().replace("vit_tiny_patch16_224", "deit_tiny_patch16_22"))
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 2
    assert "timm has no model 'deit_tiny_patch16_22'; did you mean 'deit_tiny_patch16_224'?" in done.stderr
    assert "Traceback" not in done.stderr


def _copy_plain_vit(folder):
    shutil.copy(ROOT / "examples" / "plain_vit" / "vit.py", folder / "vit.py")


def test_a_plain_pytorch_vit_from_the_users_code_builds_with_parity(write_spec, tmp_path):
    _copy_plain_vit(tmp_path)
    spec = write_spec('evc 1\nmodel plain {\n    source = python("vit:plain_vit_tiny", depth = 3)\n'
                      '    input = image(32, 32)\n}\ntarget cpu { device = cpu, format = onnx }\n')
    (result,) = build(parse_and_check(spec.read_text(), spec), tmp_path / "out")
    structure = result.manifest["structure"]
    assert structure["depth"] == 3 and structure["embed_dim"] == 192
    assert [b["attn"]["num_heads"] for b in structure["blocks"]] == [3, 3, 3]
    assert result.manifest["artifacts"][0]["parity"]["max_abs_diff"] < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("factory, message", [
    ("nosuchmodule:f", "cannot import 'nosuchmodule'"),
    ("vit:nosuchfactory", "module vit has no factory 'nosuchfactory'"),
    ("vit:PatchEmbed", "raised TypeError"),
])
def test_a_bad_python_source_names_the_module_or_factory(write_spec, tmp_path, factory, message):
    _copy_plain_vit(tmp_path)
    spec = write_spec(f'evc 1\nmodel m {{\n    source = python("{factory}")\n    input = image(32, 32)\n}}\n'
                      'target cpu { device = cpu, format = onnx }\n')
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def _cnn_spec(write_spec, tmp_path, compress=""):
    (tmp_path / "cnn.py").write_text(
        "from torch import nn\n"
        "def small_cnn():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),"
        " nn.Linear(8, 10))\n")
    return write_spec('evc 1\nmodel cnn {\n    source = python("cnn:small_cnn")\n    input = image(32, 32)\n}\n'
                      f'{compress}target cpu {{ device = cpu, format = onnx }}\n', "cnn.evc")


def test_a_model_evc_cannot_recognise_still_lowers_when_no_pass_needs_its_structure(write_spec, tmp_path):
    spec = _cnn_spec(write_spec, tmp_path)
    (result,) = build(parse_and_check(spec.read_text(), spec), tmp_path / "out")
    assert result.manifest["structure"]["recognised"] is False
    assert "node '_0'" in result.manifest["structure"]["reason"]
    assert result.manifest["params_macs"]["before"]["total"]["macs"] == 8 * 27 * 30 * 30 + 80
    assert result.manifest["artifacts"][0]["parity"]["max_abs_diff"] < 1e-4


@pytest.mark.slow
def test_a_pass_on_a_model_with_nothing_to_prune_exits_2_at_its_keep_naming_a_graph_node(write_spec, tmp_path):
    spec = _cnn_spec(write_spec, tmp_path, "compress {\n    head_prune { keep = 0.5 }\n}\n")
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 2, done.stderr
    assert "cnn.evc:7:25" in done.stderr and "nothing in this model can be pruned" in done.stderr
    assert "node '" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "cnn").exists()


@pytest.mark.slow
def test_editing_the_users_model_code_misses_the_cache(write_spec, tmp_path):
    _copy_plain_vit(tmp_path)
    spec = write_spec('evc 1\nmodel plain {\n    source = python("vit:plain_vit_tiny", depth = 1)\n'
                      '    input = image(32, 32)\n}\ntarget cpu { device = cpu, format = onnx }\n')
    out = tmp_path / "out"
    build(parse_and_check(spec.read_text(), spec), out)
    code = (tmp_path / "vit.py").read_text().replace("mlp_ratio: float = 4.0", "mlp_ratio: float = 2.0")
    (tmp_path / "vit.py").write_text(code)
    run = run_evc("build", spec, "--out", out)  # a fresh process: the edited module is imported anew
    assert run.returncode == 0, run.stderr
    assert "built" in run.stdout
    manifest = json.loads((out / "small" / "cpu" / "manifest.json").read_text())
    assert manifest["structure"]["blocks"][0]["mlp"]["hidden"] == 384
