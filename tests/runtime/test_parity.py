"""Parity between an artifact's outputs and PyTorch's."""

import json

import numpy as np
import pytest

from evc.runtime.parity import compare, describe
from tests.conftest import run_evc


def test_identical_outputs_have_cosine_1_and_full_agreement():
    x = np.random.default_rng(0).standard_normal((4, 10))
    parity = compare(x, x.copy())
    assert parity.max_abs_diff == 0 and parity.cosine == pytest.approx(1.0) and parity.top1_agreement == 1.0


def test_an_all_zero_output_agrees_with_nothing():
    """A collapsed int8 model outputs zeros: that must not pass on cosine."""
    x = np.random.default_rng(0).standard_normal((4, 10))
    assert compare(x, np.zeros_like(x)).cosine == 0.0
    assert compare(np.zeros_like(x), np.zeros_like(x)).cosine == 1.0


def test_cosine_is_the_worst_sample_mean_cosine_their_mean_and_top1_the_share_that_agrees():
    reference = np.array([[1.0, 0.0], [0.0, 1.0]])
    outputs = np.array([[1.0, 0.0], [1.0, 0.0]])
    parity = compare(reference, outputs)
    assert parity.cosine == 0.0 and parity.top1_agreement == 0.5 and parity.samples == 2
    assert parity.mean_cosine == 0.5


def test_a_map_has_no_top1_agreement_and_is_described_as_one():
    """Segmentation, depth, a backbone's features: judged on cosine and max abs diff; their argmax names no class."""
    x = np.random.default_rng(0).standard_normal((2, 5, 4, 4))
    parity = compare(x, x + 1e-6)
    assert parity.top1_agreement is None and parity.cosine == pytest.approx(1.0) and parity.within(1e-5)
    assert describe(parity.to_dict()).endswith("top-1 a map")


DENSE = """evc 1
model features {
    source = timm("vit_tiny_patch16_224", img_size = 32, patch_size = 8, depth = 2, embed_dim = 64, num_heads = 4,
                  features_only = true, out_indices = [1])
    input = image(32, 32)
}
target cpu { device = cpu, format = onnx, runs = 3, warmups = 1 }
"""


@pytest.mark.slow
def test_a_dense_model_builds_and_its_bundle_report_and_diff_say_its_output_is_a_map(tmp_path):
    spec = tmp_path / "dense.evc"
    spec.write_text(DENSE)
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "cosine 1.00000 (mean 1.00000), top-1 a map" in done.stderr + done.stdout
    bundle = tmp_path / "out" / "dense" / "cpu"
    assert json.loads((bundle / "manifest.json").read_text())["artifacts"][0]["parity"]["top1_agreement"] is None
    assert "top-1 agreement not measured (a map)" in (bundle / "README.md").read_text()
    assert '<span class="note">a map</span>' in (tmp_path / "out" / "dense" / "report.html").read_text()
    manifest = bundle / "manifest.json"
    done = run_evc("diff", manifest, manifest, "--fail-on", "agreement-1")
    assert done.returncode == 2 and "each output is a map" in done.stderr
