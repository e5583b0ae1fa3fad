"""source = hf("folder") or hf("org/name"): a Hugging Face model as save_pretrained wrote it, or as
huggingface_hub cached it, built, pruned, exported, keyed and pinned.

This machine cannot reach the Hub, so the repository tests lay out a cache as huggingface_hub does
(models--org--name/{blobs, refs/main, snapshots/<commit>/<file>}) and run offline (`hub_cache`).
"""

import json
import subprocess
import sys

import pytest

from evc.driver import build
from evc.errors import InputError
from evc.keys import derive
from evc.model.load import build_module
from evc.spec.check import parse_and_check
from evc.spec.plan import Source
from tests.conftest import ROOT, run_evc
from tests.families import hf_config

COMPRESS = "compress {\n    head_prune { keep = 1/2 }\n    ffn_prune { keep = 50% }\n}\n"
TARGET = "target cpu { device = cpu, format = onnx }\n"


def save(folder, kind="vit", model="ViTForImageClassification", seed=0, config=None):
    import torch
    import transformers

    torch.manual_seed(seed)
    getattr(transformers, model)(config or hf_config(kind)).save_pretrained(folder)
    return folder


REPO = "org/tiny-vit"
FIRST, SECOND = "1" * 40, "2" * 40  # commits


def cache(hub_cache, commit, seed=0, repo=REPO):
    """A tiny ViT save_pretrained wrote, cached as `repo` at `commit`, now its main: its snapshot folder."""
    from evc.keys import file_digest

    saved = save(hub_cache.parent / "saved" / commit, seed=seed, config=hf_config(layers=2, hidden=32, heads=2))
    folder = hub_cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir(exist_ok=True)
    for file in saved.iterdir():
        blob = file.rename(folder / "blobs" / file_digest(file))
        (snapshot / file.name).symlink_to(f"../../blobs/{blob.name}")
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


def spec_text(source='hf("vit")', model_extra="", extra=""):
    return f"evc 1\nmodel vit {{\n    source = {source}\n    input = image(32, 32)\n{model_extra}}}\n{extra}{TARGET}"


@pytest.mark.slow
def test_a_saved_vit_is_pruned_and_exported_with_parity(write_spec, tmp_path):
    save(tmp_path / "vit")
    spec = write_spec(spec_text(extra=COMPRESS))
    (result,) = build(parse_and_check(spec.read_text(), spec), tmp_path / "out")
    blocks = result.manifest["structure"]["blocks"]
    assert [(b["attn"]["num_heads"], b["mlp"]["hidden"]) for b in blocks] == [(2, 128)] * 4
    assert result.manifest["structure"]["head"] == ["classifier"]
    assert result.manifest["artifacts"][0]["parity"]["max_abs_diff"] < 1e-4


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_feature_model_compresses_the_output_the_spec_names(write_spec, tmp_path):
    save(tmp_path / "vit", model="ViTModel")
    spec = write_spec(spec_text(model_extra='    output = "pooler_output"\n'))
    (result,) = build(parse_and_check(spec.read_text(), spec), tmp_path / "out")
    assert result.manifest["structure"]["head"] == ["pooler.dense"]


@pytest.mark.slow
def test_an_output_the_model_does_not_return_is_exit_2_naming_the_key_and_the_outputs(write_spec, tmp_path):
    save(tmp_path / "vit")
    spec = write_spec(spec_text(model_extra='    output = "probs"\n'))
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 2
    assert "output = \"probs\": model 'ViTForImageClassification' returns no 'probs'; it returns 'logits'" \
        in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_explain_shows_the_structure_of_a_hf_model(write_spec, tmp_path):
    save(tmp_path / "vit")
    done = run_evc("explain", write_spec(spec_text(extra=COMPRESS)), "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "block 3: attn 4x16, mlp 256, 17 tokens" in done.stdout  # as loaded; the passes' result below
    assert "4 → 2" in done.stdout and "256 → 128" in done.stdout


@pytest.mark.slow
def test_build_and_explain_print_no_library_deprecation(write_spec, tmp_path):
    """transformers imports torchao, whose enums torch's pytree logs as deprecated: not the user's concern."""
    save(tmp_path / "vit", config=hf_config(layers=2, hidden=32, heads=2))
    spec = write_spec(spec_text(extra=COMPRESS))
    for command in ("build", "explain"):
        done = run_evc(command, spec, "--out", tmp_path / command)
        assert done.returncode == 0, done.stderr
        assert "deprecat" not in done.stderr.lower() and "Warning" not in done.stderr, done.stderr


def test_a_folder_without_config_json_names_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r'hf\("empty"\): .*empty has no config.json'):
        build_module(Source("hf", "empty"), tmp_path)


def test_no_folder_and_no_cached_repository_is_an_input_error(hub_cache, tmp_path):
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


@pytest.mark.slow
def test_a_cached_repository_builds_and_the_manifest_pins_repository_commit_and_digest(hub_cache, write_spec,
                                                                                      tmp_path):
    from evc.keys import folder_digest

    snapshot = cache(hub_cache, FIRST)
    spec = write_spec(spec_text(f'hf("{REPO}")'))
    (result,) = build(parse_and_check(spec.read_text(), spec), tmp_path / "out")
    assert result.manifest["model"]["weights"] == {"source": f"hf('{REPO}')", "hub": REPO, "revision": FIRST,
                                                   "sha256": folder_digest(snapshot)}
    assert result.manifest["artifacts"][0]["parity"]["max_abs_diff"] < 1e-4


def test_an_unchanged_cache_derives_the_same_keys(hub_cache, write_spec):
    cache(hub_cache, FIRST)
    spec = write_spec(spec_text(f'hf("{REPO}")'))
    assert derive(parse_and_check(spec.read_text(), spec)) == derive(parse_and_check(spec.read_text(), spec))


@pytest.mark.slow
def test_a_new_revision_in_the_cache_changes_the_key_and_the_manifests_revision(hub_cache, write_spec, tmp_path):
    cache(hub_cache, FIRST, seed=1)
    spec = write_spec(spec_text(f'hf("{REPO}")'))
    before = derive(parse_and_check(spec.read_text(), spec))
    cache(hub_cache, SECOND, seed=2)
    after = derive(parse_and_check(spec.read_text(), spec))
    assert after.weights != before.weights
    assert after.load != before.load and after.bundle["cpu"] != before.bundle["cpu"]
    (result,) = build(parse_and_check(spec.read_text(), spec), tmp_path / "out")
    assert result.manifest["model"]["weights"]["revision"] == SECOND


def test_an_edited_cached_config_changes_the_key(hub_cache, write_spec):
    snapshot = cache(hub_cache, FIRST)
    spec = write_spec(spec_text(f'hf("{REPO}")'))
    before = derive(parse_and_check(spec.read_text(), spec)).load
    blob = (snapshot / "config.json").resolve()
    config = json.loads(blob.read_text())
    blob.write_text(json.dumps({**config, "layer_norm_eps": 1e-6}))
    assert derive(parse_and_check(spec.read_text(), spec)).load != before


def test_a_revision_keyword_keys_and_loads_that_commit_not_main(hub_cache, write_spec, tmp_path):
    import torch

    from evc.keys import folder_digest

    first = cache(hub_cache, FIRST, seed=1)
    cache(hub_cache, SECOND, seed=2)
    spec = write_spec(spec_text(f'hf("{REPO}", revision = "{FIRST}")'))
    assert derive(parse_and_check(spec.read_text(), spec)).weights == folder_digest(first)
    loaded = build_module(Source("hf", REPO, (("revision", FIRST),)), tmp_path).state_dict()
    expected = build_module(Source("hf", str(first)), tmp_path).state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_a_repository_missing_from_the_cache_exits_2_naming_it_and_how_to_fetch_it(hub_cache, write_spec,
                                                                                   tmp_path):
    done = run_evc("build", write_spec(spec_text('hf("nobody/no-such-vit")')), "--out", tmp_path / "out")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f'no model "nobody/no-such-vit" in huggingface_hub\'s cache ({hub_cache})' in done.stderr
    assert "fetch it once with `hf download nobody/no-such-vit`" in done.stderr


def test_a_repositorys_key_is_derived_from_hf_home_without_importing_torch(tmp_path, monkeypatch, write_spec):
    from evc.keys import folder_digest

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = cache(tmp_path / "home" / "hub", FIRST)
    spec = write_spec(spec_text(f'hf("{REPO}")'))
    code = ("import sys; from evc.spec.check import parse_and_check; from evc.keys import derive; "
            f"spec = {str(spec)!r}; keys = derive(parse_and_check(open(spec).read(), spec)); print(keys.weights); "
            "assert not {'torch', 'transformers'} & set(sys.modules), 'torch or transformers was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == folder_digest(snapshot)
