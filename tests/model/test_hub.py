"""`weights = hub("org/name")`: checkpoints from huggingface_hub's cache, pinned in the manifest and keyed.

This machine cannot reach the Hub, so each test lays out a cache as huggingface_hub
does (models--org--name/{blobs, refs/main, snapshots/<commit>/<file>}) and runs offline.
"""

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from evc.errors import InputError
from evc.keys import file_digest
from evc.model.hub import fetch
from evc.spec.plan import HubWeights
from tests.conftest import ROOT, SMALL_MODEL, check_fails, put_checkpoint, run_evc

REPO = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
FIRST, SECOND = "1" * 40, "2" * 40  # commits


def small_vit(seed: int):
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10).eval()


def hub_spec(tmp_path, weights: str = f'hub("{REPO}")', image: str = "image()") -> str:
    spec = tmp_path / "hub.evc"
    spec.write_text(f"evc 1\nmodel small {{\n    source = {SMALL_MODEL}\n    input = {image}\n"
                    f"    weights = {weights}\n}}\n"
                    "target cpu { device = cpu, format = onnx, runs = 3, warmups = 1 }\n")
    return spec


def built(spec, out) -> tuple[str, dict]:
    done = run_evc("build", spec, "--out", out)
    assert done.returncode == 0, done.stderr
    return done.stdout, json.loads((out / "hub" / "cpu" / "manifest.json").read_text())


@pytest.mark.slow
def test_hub_weights_build_a_model_whose_outputs_are_the_checkpoints(hub_cache, tmp_path):
    checkpoint = small_vit(seed=1)
    put_checkpoint(hub_cache, REPO, FIRST, "model.safetensors", checkpoint)
    _, manifest = built(hub_spec(tmp_path), tmp_path / "out")
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    session = ort.InferenceSession(str(tmp_path / "out" / "hub" / "cpu" / "model.onnx"))
    with torch.no_grad():
        expected, random_init = checkpoint(torch.from_numpy(x)).numpy(), small_vit(seed=0)(torch.from_numpy(x))
    np.testing.assert_allclose(session.run(None, {"input": x})[0], expected, atol=1e-4)
    assert np.abs(expected - random_init.numpy()).max() > 1e-2  # the weights made the difference


@pytest.mark.slow
def test_the_manifest_pins_repository_commit_file_and_sha256(hub_cache, tmp_path):
    put_checkpoint(hub_cache, REPO, FIRST, "model.safetensors", small_vit(seed=1))
    _, manifest = built(hub_spec(tmp_path), tmp_path / "out")
    blob = next((hub_cache / f"models--{REPO.replace('/', '--')}" / "blobs").iterdir())
    assert manifest["model"]["weights"] == {"hub": REPO, "revision": FIRST, "file": "model.safetensors",
                                            "sha256": file_digest(blob)}


@pytest.mark.slow
def test_a_new_commit_in_the_cache_changes_the_key_and_rebuilds(hub_cache, tmp_path):
    put_checkpoint(hub_cache, REPO, FIRST, "model.safetensors", small_vit(seed=1))
    spec, out = hub_spec(tmp_path), tmp_path / "out"
    built(spec, out)
    assert built(spec, out)[0].startswith("up to date")
    put_checkpoint(hub_cache, REPO, SECOND, "model.safetensors", small_vit(seed=2))
    stdout, manifest = built(spec, out)
    assert stdout.startswith("built")
    assert manifest["model"]["weights"]["revision"] == SECOND


def test_an_edited_cached_file_changes_the_key(hub_cache, tmp_path):
    from evc.keys import derive
    from evc.spec.check import parse_and_check

    put_checkpoint(hub_cache, REPO, FIRST, "model.safetensors", small_vit(seed=1))
    spec = hub_spec(tmp_path)
    before = derive(parse_and_check(spec.read_text(), spec))
    path = fetch(HubWeights(REPO)).path
    from safetensors.torch import save_file

    target = path.resolve()
    target.unlink()
    save_file(small_vit(seed=3).state_dict(), str(target))
    after = derive(parse_and_check(spec.read_text(), spec))
    assert after.weights == file_digest(path) != before.weights
    assert after.load != before.load and after.bundle["cpu"] != before.bundle["cpu"]


def test_pytorch_model_bin_is_used_when_the_repository_has_no_safetensors(hub_cache):
    put_checkpoint(hub_cache, REPO, FIRST, "pytorch_model.bin", small_vit(seed=1))
    checkpoint = fetch(HubWeights(REPO))
    assert (checkpoint.file, checkpoint.revision) == ("pytorch_model.bin", FIRST)
    assert checkpoint.path.name == "pytorch_model.bin" and checkpoint.path.is_file()


def test_a_revision_pins_that_commit_and_file_names_the_checkpoint(hub_cache):
    put_checkpoint(hub_cache, REPO, FIRST, "model.safetensors", small_vit(seed=1))
    put_checkpoint(hub_cache, REPO, SECOND, "other.safetensors", small_vit(seed=2))
    assert fetch(HubWeights(REPO, revision=FIRST)).revision == FIRST
    assert fetch(HubWeights(REPO, file="other.safetensors")).revision == SECOND
    with pytest.raises(InputError, match=f"{REPO} is not in the Hugging Face cache .*no other.safetensors"):
        fetch(HubWeights(REPO, revision=FIRST, file="other.safetensors"))


def test_a_repository_missing_offline_exits_2_naming_it_and_how_to_fetch_it(hub_cache, tmp_path):
    done = run_evc("build", hub_spec(tmp_path, 'hub("timm/no_such_model.tag")'), "--out", tmp_path / "out")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "timm/no_such_model.tag is not in the Hugging Face cache" in done.stderr
    assert "HF_HUB_OFFLINE is set" in done.stderr and "`hf download timm/no_such_model.tag model.safetensors`" in \
        done.stderr
    assert not (tmp_path / "out" / "hub").exists()


@pytest.mark.slow
def test_a_hub_checkpoint_that_does_not_fit_exits_2_naming_the_mismatch(hub_cache, tmp_path):
    import timm

    put_checkpoint(hub_cache, REPO, FIRST, "model.safetensors",
                   timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=10))
    done = run_evc("build", hub_spec(tmp_path), "--out", tmp_path / "out")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "does not fit model 'small': unexpected keys: blocks.2." in done.stderr


def test_check_and_key_derivation_import_neither_torch_nor_timm(hub_cache, tmp_path):
    put_checkpoint(hub_cache, REPO, FIRST, "model.safetensors", small_vit(seed=1))
    spec = hub_spec(tmp_path)
    code = ("import sys; from evc.spec.check import parse_and_check; from evc.keys import derive; "
            f"spec = {str(spec)!r}; keys = derive(parse_and_check(open(spec).read(), spec)); "
            "print(keys.weights); assert not {'torch', 'timm'} & set(sys.modules), 'torch or timm was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == file_digest(fetch(HubWeights(REPO)).path)


def test_check_accepts_a_hub_repository_that_is_not_cached(hub_cache, tmp_path):
    done = run_evc("check", hub_spec(tmp_path, 'hub("timm/not_cached", revision = "v1", file = "w.bin")'))
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("weights, message", [
    ('hub()', "5:15: error: weights: hub(...) takes one string: the repository"),
    ('hub("a/b", branch = "x")', "5:26: error: weights: unknown argument 'branch' of hub(...)"),
    ('hub("a b")', '5:19: error: weights: "a b" is not a repository id'),
    ('hug("a/b")', "5:15: error: weights: expected a path to a .safetensors or .pth file, or hub(\"org/name\"), "
                   "found a call to hug(...)"),
])
def test_a_malformed_hub_call_is_a_spec_error_at_its_span(tmp_path, weights, message):
    stderr = check_fails(hub_spec(tmp_path, weights))
    assert message in stderr


def test_hf_home_places_the_cache_as_huggingface_hub_reads_it(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    put_checkpoint(tmp_path / "home" / "hub", REPO, FIRST, "model.safetensors", small_vit(seed=1))
    code = (f"from evc.model.hub import fetch; from evc.spec.plan import HubWeights; "
            f"print(fetch(HubWeights({REPO!r})).path)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "home" / "hub" / f"models--{REPO.replace('/', '--')}" /
                                      "snapshots" / FIRST / "model.safetensors")
