"""The evaluate block: top-k of the model as loaded, compressed, and of each artifact, as one table."""

import json

import numpy as np
import pytest

from evc.runtime.evaluate import accuracy
from tests.conftest import check_fails, run_evc, small_spec, write_images


def test_accuracy_counts_a_label_among_the_k_highest_logits():
    logits = np.array([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5]])
    labels = np.array([1, 2, 0])
    assert accuracy(logits, labels, (1, 2, 3)) == pytest.approx({"top1": 1 / 3, "top2": 2 / 3, "top3": 1.0})


def labelled_folder(root, classes=10, per_class=2):
    root.mkdir()
    for c in range(classes):
        write_images(root / f"class_{c}", per_class, seed=c)
    return root


@pytest.mark.slow
def test_a_build_records_and_prints_accuracy_before_after_and_per_artifact(write_spec, tmp_path):
    labelled_folder(tmp_path / "val")
    spec = write_spec(small_spec(extra='data val { images = "val" }\ncompress {\n    head_prune { keep = 2/3 }\n}\n'
                                       "evaluate { data = val, top = [1, 5] }\n"))
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "accuracy on data 'val' (20 images)" in done.stdout and "cpu: model.onnx" in done.stdout
    manifest = json.loads((tmp_path / "out" / "small" / "cpu" / "manifest.json").read_text())
    evaluation = manifest["evaluation"]
    assert evaluation["samples"] == 20 and evaluation["top"] == [1, 5]
    assert evaluation["compressed"]["macs"] < evaluation["original"]["macs"]
    assert evaluation["original"]["latency_ms"] > 0
    for k in ("top1", "top5"):
        assert manifest["artifacts"][0]["accuracy"][k] == pytest.approx(evaluation["compressed"][k])
    assert evaluation["original"]["top5"] >= evaluation["original"]["top1"]
    again = run_evc("build", spec, "--out", tmp_path / "out")  # up to date: the table again, from the manifest
    assert "up to date" in again.stdout and "accuracy on data 'val'" in again.stdout


@pytest.mark.slow
def test_evaluating_on_unlabelled_images_exits_2_naming_the_data(write_spec, tmp_path):
    spec = write_spec(small_spec(extra="data val { synthetic = 4 }\nevaluate { data = val }\n"))
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 2
    assert "data 'val' has no labels" in done.stderr and "Traceback" not in done.stderr


def test_evaluate_naming_undefined_data_is_a_spec_error(write_spec):
    stderr = check_fails(write_spec(small_spec(extra="data val { synthetic = 4 }\nevaluate { data = vla }\n")))
    assert "undefined data 'vla'" in stderr and "did you mean 'val'" in stderr


@pytest.mark.slow
def test_every_artifact_with_a_runtime_here_is_scored_int8_proxy_and_tflite_included(write_spec, tmp_path):
    labelled_folder(tmp_path / "val", per_class=1)
    targets = ("target phone { device = android, format = tflite }\n"
               "target x5 { device = rdk_x5, format = bpu, quantize = int8, calibrate = val }")
    spec = write_spec(small_spec(targets=targets, extra='data val { images = "val" }\nevaluate { data = val }\n'))
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    scored = {}
    for target in ("phone", "x5"):
        manifest = json.loads((tmp_path / "out" / "small" / target / "manifest.json").read_text())
        scored.update({a["path"]: a["accuracy"]["top1"] for a in manifest["artifacts"]})
    assert set(scored) == {"model.tflite", "model.onnx", "model_int8_proxy.onnx"}
    for name in scored:
        assert f": {name}" in done.stdout
