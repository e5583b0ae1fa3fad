"""source = hf("folder"): a Hugging Face model as save_pretrained wrote it, built, pruned and exported."""

import json

import pytest

from evc.check import parse_and_check
from evc.driver import build
from evc.errors import InputError
from evc.keys import derive
from evc.load import build_module
from evc.plan import Source
from tests.conftest import run_evc
from tests.families import hf_config

COMPRESS = "compress {\n    head_prune { keep = 1/2 }\n    ffn_prune { keep = 50% }\n}\n"
TARGET = "target cpu { device = cpu, format = onnx }\n"


def save(folder, kind="vit", model="ViTForImageClassification"):
    import torch
    import transformers

    torch.manual_seed(0)
    getattr(transformers, model)(hf_config(kind)).save_pretrained(folder)
    return folder


def spec_text(source='hf("vit")', model_extra="", extra=""):
    return f"evc 1\nmodel vit {{\n    source = {source}\n    input = image(32, 32)\n{model_extra}}}\n{extra}{TARGET}"


def test_a_saved_vit_is_pruned_and_exported_with_parity(write_spec, tmp_path):
    save(tmp_path / "vit")
    spec = write_spec(spec_text(extra=COMPRESS))
    (result,) = build(parse_and_check(spec.read_text(), spec), tmp_path / "out")
    blocks = result.manifest["structure"]["blocks"]
    assert [(b["attn"]["num_heads"], b["mlp"]["hidden"]) for b in blocks] == [(2, 128)] * 4
    assert result.manifest["structure"]["head"] == ["classifier"]
    assert result.manifest["artifacts"][0]["parity"]["max_abs_diff"] < 1e-4


def test_the_folders_weights_are_the_models_weights_not_a_random_init(write_spec, tmp_path):
    from evc.keys import folder_digest

    save(tmp_path / "vit")
    spec = write_spec(spec_text())
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "randomly initialised" not in done.stderr
    manifest = json.loads((tmp_path / "out" / "small" / "cpu" / "manifest.json").read_text())
    assert manifest["model"]["weights"] == {"source": "hf('vit')", "sha256": folder_digest(tmp_path / "vit")}


def test_the_class_config_json_names_is_built_with_the_keywords_given(tmp_path):
    save(tmp_path / "deit", "deit", "DeiTForImageClassificationWithTeacher")
    model = build_module(Source("hf", "deit", (("attn_implementation", "sdpa"),)), tmp_path)
    assert type(model).__name__ == "DeiTForImageClassificationWithTeacher"
    assert model.config._attn_implementation == "sdpa"


def test_a_feature_model_compresses_the_output_the_spec_names(write_spec, tmp_path):
    save(tmp_path / "vit", model="ViTModel")
    spec = write_spec(spec_text(model_extra='    output = "pooler_output"\n'))
    (result,) = build(parse_and_check(spec.read_text(), spec), tmp_path / "out")
    assert result.manifest["structure"]["head"] == ["pooler.dense"]


def test_an_output_the_model_does_not_return_is_exit_2_naming_the_key_and_the_outputs(write_spec, tmp_path):
    save(tmp_path / "vit")
    spec = write_spec(spec_text(model_extra='    output = "probs"\n'))
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 2
    assert "output = \"probs\": model 'ViTForImageClassification' returns no 'probs'; it returns 'logits'" \
        in done.stderr
    assert "Traceback" not in done.stderr


def test_explain_shows_the_structure_of_a_hf_model(write_spec, tmp_path):
    save(tmp_path / "vit")
    done = run_evc("explain", write_spec(spec_text(extra=COMPRESS)), "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "block 3: attn 2x16, mlp 128, 17 tokens" in done.stdout
    assert "4 → 2" in done.stdout and "256 → 128" in done.stdout


def test_a_folder_without_config_json_names_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r'hf\("empty"\): .*empty has no config.json'):
        build_module(Source("hf", "empty"), tmp_path)


def test_no_folder_and_no_cached_repository_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match=r'hf\("nobody/no-such-vit"\): no folder .* and no model'):
        build_module(Source("hf", "nobody/no-such-vit"), tmp_path)


@pytest.mark.parametrize("change", ["config.json", "model.safetensors"])
def test_changing_the_folders_config_or_weights_changes_the_load_key(write_spec, tmp_path, change):
    folder = save(tmp_path / "vit")
    spec = write_spec(spec_text())
    before = derive(parse_and_check(spec.read_text(), spec)).load
    if change == "config.json":
        config = json.loads((folder / change).read_text())
        (folder / change).write_text(json.dumps({**config, "layer_norm_eps": 1e-6}))
    else:
        (folder / change).write_bytes((folder / change).read_bytes() + b" ")
    assert derive(parse_and_check(spec.read_text(), spec)).load != before
