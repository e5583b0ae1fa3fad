"""finetune inside a build: it trains, records its epochs, resumes from the cache, and runs under torchrun."""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import check_fails, run_evc, small_spec, write_images

FINETUNE = "finetune {{ data = train, epochs = 2, lr = 1e-3, batch = 16, {extra} }}"


def spec_text(digits, extra="teacher = none, alpha = 0, augment = none"):
    data = f'data train {{ images = "{digits / "train"}" }}\ndata val {{ images = "{digits / "val"}" }}\n'
    return small_spec(extra=data + "compress {\n    head_prune { keep = 2/3 }\n    "
                      + FINETUNE.format(extra=extra) + "\n}\nevaluate { data = val, top = [1] }\n")


def manifest(out):
    return json.loads((out / "small" / "cpu" / "manifest.json").read_text())


@pytest.mark.slow
def test_finetuning_a_pruned_model_learns_the_task_and_records_its_epochs(write_spec, tmp_path, digits):
    spec = write_spec(spec_text(digits))
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "epoch 2/2" in done.stderr
    result = manifest(tmp_path / "out")
    found = result["passes"][1]["found"]
    assert [e["epoch"] for e in found["epochs"]] == [1, 2] and found["best_epoch"] in (1, 2)
    assert found["epochs"][1]["loss"] < found["epochs"][0]["loss"]
    evaluation = result["evaluation"]
    assert evaluation["compressed"]["top1"] > 0.5 > evaluation["original"]["top1"]  # random init, then trained
    assert max(e["top1"] for e in found["epochs"]) == pytest.approx(evaluation["compressed"]["top1"])


@pytest.mark.slow
def test_an_interrupted_finetune_resumes_from_its_checkpoint_in_the_cache(write_spec, tmp_path, digits):
    spec = write_spec(spec_text(digits))
    out = tmp_path / "out"
    assert run_evc("build", spec, "--out", out).returncode == 0
    first = manifest(out)["artifacts"][0]["sha256"]
    # Lose the compressed program and the bundle, as a build killed after the last epoch would:
    # the next build finds the finetune checkpoint and trains no epoch again.
    for entry in (out / ".cache" / "program").iterdir():
        if json.loads((entry / "summary.json").read_text())["found"]:
            subprocess.run(["rm", "-r", str(entry)], check=True)
    subprocess.run(["rm", "-r", str(out / "small")], check=True)
    again = run_evc("build", spec, "--out", out)
    assert again.returncode == 0, again.stderr
    assert "epoch 1/2" not in again.stderr
    assert manifest(out)["artifacts"][0]["sha256"] == first


@pytest.mark.slow
def test_unlabelled_images_with_cross_entropy_exit_2_naming_the_data(write_spec, tmp_path):
    write_images(tmp_path / "flat", 4)
    text = small_spec(extra='data train { images = "flat" }\ncompress {\n    '
                      + FINETUNE.format(extra="alpha = 0.5") + "\n}\n")
    done = run_evc("build", write_spec(text), "--out", tmp_path / "out")
    assert done.returncode == 2
    assert "data 'train' has no labels" in done.stderr and "small.evc:8:" in done.stderr


def test_teacher_none_with_a_distillation_weight_is_a_spec_error(write_spec, tmp_path, digits):
    assert "set alpha = 0" in check_fails(write_spec(spec_text(digits, extra="teacher = none, alpha = 0.5")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_same_build_under_torchrun_trains_on_two_processes_and_writes_one_bundle(write_spec, tmp_path, digits):
    spec = write_spec(spec_text(digits))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "evc", "build", str(spec), "--out", str(tmp_path / "ddp")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("built: ") == 1 and done.stderr.count("epoch 2/2") == 1
    assert run_evc("build", spec, "--out", tmp_path / "one").returncode == 0
    ddp, one = manifest(tmp_path / "ddp"), manifest(tmp_path / "one")
    # Two ranks with the global batch see the batches one process sees; only summation order differs.
    assert [e["loss"] for e in ddp["passes"][1]["found"]["epochs"]] == pytest.approx(
        [e["loss"] for e in one["passes"][1]["found"]["epochs"]], rel=1e-3)


@pytest.mark.slow
def test_another_model_block_can_teach_and_changing_it_retrains(write_spec, tmp_path, digits):
    teacher = 'model teacher {{ source = timm("vit_tiny_patch16_224", img_size = 32, patch_size = 8, depth = {d}, ' \
              'num_classes = 10) }}\n'
    text = spec_text(digits, extra="teacher = teacher, alpha = 1, augment = none").replace(
        "data train", teacher.format(d=3) + "data train", 1)
    spec = write_spec(text)
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert manifest(tmp_path / "out")["passes"][1]["params"]["teacher"] == "teacher"
    spec.write_text(text.replace("depth = 3", "depth = 1"))
    again = run_evc("build", spec, "--out", tmp_path / "out")
    assert again.returncode == 0 and "built: " in again.stdout and "epoch 2/2" in again.stderr


@pytest.mark.slow
def test_prune_finetune_prune_finetune_each_finetune_trains_what_came_before(write_spec, tmp_path, digits):
    one = FINETUNE.format(extra="teacher = none, alpha = 0, augment = none").replace("epochs = 2", "epochs = 1")
    text = spec_text(digits).replace("compress {\n", "compress {\n    ffn_prune { keep = 0.5 }\n    " + one + "\n", 1)
    done = run_evc("build", write_spec(text), "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    passes = manifest(tmp_path / "out")["passes"]
    assert [p["name"] for p in passes] == ["ffn_prune", "finetune", "head_prune", "finetune"]
    assert len(passes[1]["found"]["epochs"]) == 1 and len(passes[3]["found"]["epochs"]) == 2
    assert done.stderr.count("epoch 1/1") == 1 and done.stderr.count("epoch 2/2") == 1


@pytest.mark.slow
def test_by_default_the_learning_rate_and_augmentation_fit_the_model_and_images(write_spec, tmp_path, digits):
    text = spec_text(digits).replace("lr = 1e-3, ", "").replace(", augment = none", "")
    assert "lr" not in text.split("finetune")[1] and "augment" not in text
    done = run_evc("build", write_spec(text), "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    result = manifest(tmp_path / "out")
    chosen = result["passes"][1]["found"]["chosen"]
    assert chosen["augment"] == "none"  # 32 x 32: no random crops
    assert 1e-5 <= chosen["lr"] <= 1e-2  # from the range test
    evaluation = result["evaluation"]  # a random-init model, trained 2 epochs at a rate chosen for finetuning
    assert evaluation["compressed"]["top1"] > evaluation["original"]["top1"] + 0.1
