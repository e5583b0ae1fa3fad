"""A feature extractor (no classifier: timm's num_classes = 0) is recognised, compressed, lowered and checked on
its features; evaluate, which needs class logits, refuses it by name."""

import json

import pytest
import timm
import torch

from evc.ir.program import Program
from evc.passes.ffn_prune import FfnPrune
from evc.passes.head_prune import HeadPrune
from evc.passes.patch_slim import PatchSlim
from evc.spec.plan import ImageInput
from tests.conftest import SMALL_MODEL, run_evc, small_spec, write_images
from tests.passes.conftest import SIZE, Ctx, images, outputs, zero_heads, zero_hidden

FEATURES = 'timm("vit_tiny_patch16_224", img_size = 32, patch_size = 8, depth = 2, num_classes = 0)'


def program():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=SIZE, patch_size=8, depth=2, num_classes=0)
    return Program.from_module(model.eval(), ImageInput(SIZE, SIZE))


def test_a_model_without_a_classifier_is_recognised_as_features():
    structure = program().structure
    assert structure.head == () and structure.num_classes == 0 and structure.depth == 2
    assert "no head: features, 192 wide" in structure.describe()


def test_pruning_zeroed_heads_and_units_of_a_feature_extractor_keeps_its_features():
    p = program()
    zero_heads(p, {0: [1], 1: [2]})
    zero_hidden(p, {0: list(range(0, 768, 2)), 1: list(range(0, 768, 2))})
    before = outputs(p)
    heads = {"keep": 2 / 3, "score": "l1", "scope": "layer", "min_heads": 1, "data": None}
    ffn = {"keep": 0.5, "score": "l1", "round_to": 8, "data": None}
    after = FfnPrune().run(HeadPrune().run(p, heads, Ctx(heads)), ffn, Ctx(ffn))
    assert [b.attn.num_heads for b in after.structure.blocks] == [2, 2]
    assert [b.mlp.hidden for b in after.structure.blocks] == [384, 384]
    assert before.shape == (4, 192) and torch.allclose(outputs(after), before, atol=1e-5)


def test_patch_slims_search_measures_a_feature_extractors_own_output():
    params = {"keep": 1.0, "score": "cls_attention", "fuse": False,
              "search": {"tolerance": 0.05, "step": 4, "data": "calib"}}
    ctx = Ctx(params, images())
    PatchSlim().run(program(), params, ctx)
    assert ctx.found["keep"][0] == 1 and len(ctx.found["keep"]) == 2


@pytest.mark.slow
def test_a_feature_extractor_builds_to_onnx_with_parity_on_its_features(write_spec, tmp_path):
    compress = "compress {\n    head_prune { keep = 2/3 }\n    ffn_prune { keep = 0.5 }\n}\n"
    spec = write_spec(small_spec().replace(SMALL_MODEL, FEATURES).replace("target", compress + "target", 1))
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "out" / "small" / "cpu" / "manifest.json").read_text())
    assert manifest["output"]["shape"] == [1, 192] and manifest["structure"]["head"] == []
    parity = manifest["artifacts"][0]["parity"]
    assert parity["max_abs_diff"] < 1e-4 and parity["cosine"] > 0.9999


@pytest.mark.slow
def test_evaluate_refuses_a_feature_extractor_naming_the_model(write_spec, tmp_path):
    (tmp_path / "val").mkdir()
    write_images(tmp_path / "val" / "a", 2)
    write_images(tmp_path / "val" / "b", 2, seed=1)
    spec = write_spec(small_spec(extra='data val { images = "val" }\nevaluate { data = val }\n')
                      .replace(SMALL_MODEL, FEATURES))
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "evaluate: model 'small' has no classifier: it outputs 192-wide features" in done.stderr
    assert not (tmp_path / "out" / "small" / "cpu").exists()
