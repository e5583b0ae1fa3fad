"""The build driver: bundles, manifests, the stage cache, atomic replacement, parity failure."""

import hashlib
import json
import signal
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest

from evc.driver import build
from evc.errors import BuildError
from evc.spec.check import parse_and_check
from tests.conftest import ROOT, run_evc, small_spec, write_images

TWO_TARGETS = ("target a { device = cpu, format = onnx, runs = 3 }\n"
               "target b { device = cpu, format = onnx, runs = 3 }")


def plan_of(path):
    return parse_and_check(path.read_text(), path)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_writes_a_bundle_with_artifact_manifest_readme_and_script(write_spec, tmp_path):
    spec = write_spec(small_spec())
    (result,) = build(plan_of(spec), tmp_path / "out")
    bundle = tmp_path / "out" / "small" / "cpu"
    assert result.bundle == bundle and not result.cached
    assert sorted(p.name for p in bundle.iterdir()) == ["README.md", "bench.py", "manifest.json", "model.onnx"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["spec"] == {"path": str(spec), "sha256": sha256(spec)}
    assert manifest["model"]["weights"] == "random"
    assert manifest["input"]["shape"] == [1, 3, 32, 32] and manifest["input"]["dtype"] == "float32"
    assert manifest["output"]["shape"] == [1, 10]
    (artifact,) = manifest["artifacts"]
    assert artifact["sha256"] == sha256(bundle / "model.onnx")
    assert artifact["size"] == (bundle / "model.onnx").stat().st_size
    assert artifact["parity"]["max_abs_diff"] < 1e-4 and artifact["parity"]["top1_agreement"] == 1.0
    assert artifact["parity"]["cosine"] > 0.99999
    before = manifest["params_macs"]["before"]
    assert len(before["blocks"]) == 2 and before["total"]["macs"] > 0
    assert before["total"]["params"] == sum(b["params"] for b in before["blocks"]) + before["stem"]["params"] \
        + before["head"]["params"]
    groups = manifest["groups"]  # the pruning groups of the model as loaded
    assert groups["heads"] == {"groups": 2, "heads": 6} and groups["units"] == {"groups": 2, "units": 1536}
    assert groups["streams"] == [192]
    assert {"width": 10, "members": ["head.weight", "head.bias"],
            "reason": "it reaches the model's output at node 'head'"} in groups["frozen"]
    assert (bundle / "bench.py").stat().st_mode & 0o111
    assert "randomly initialised" in (bundle / "README.md").read_text()


def test_the_onnx_artifact_reproduces_the_model_outside_evc(write_spec, tmp_path):
    spec = write_spec(small_spec())
    (result,) = build(plan_of(spec), tmp_path / "out")
    import timm
    import torch

    session = ort.InferenceSession(str(result.bundle / "model.onnx"))
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32), dtype=np.float32)
    onnx_logits = session.run(None, {"input": x})[0]
    # The cached program is the model that was exported; it runs as an ordinary module.
    from evc.ir.program import Program

    (program_dir,) = (tmp_path / "out" / ".cache" / "program").iterdir()
    program = Program.load(program_dir / "program.pt")
    assert isinstance(program.graph, torch.nn.Module) and not isinstance(program.graph, timm.models.VisionTransformer)
    np.testing.assert_allclose(onnx_logits, program.run(x).numpy(), atol=1e-4)


def test_an_unchanged_spec_rebuilds_from_cache_without_importing_torch(write_spec, tmp_path):
    spec = write_spec(small_spec())
    out = tmp_path / "out"
    build(plan_of(spec), out)
    onnx_file = out / "small" / "cpu" / "model.onnx"
    stamp = onnx_file.stat().st_mtime_ns
    code = ("import sys; from evc.cli import main; "
            f"assert main(['build', {str(spec)!r}, '--out', {str(out)!r}]) == 0; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stdout
    assert onnx_file.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_a_comment_edit_rebuilds_nothing_but_restamps_the_spec_hash(write_spec, tmp_path):
    spec = write_spec(small_spec())
    build(plan_of(spec), tmp_path / "out")
    spec.write_text("# a new comment\n" + spec.read_text())
    (result,) = build(plan_of(spec), tmp_path / "out")
    assert result.cached
    assert json.loads((result.bundle / "manifest.json").read_text())["spec"]["sha256"] == sha256(spec)


def test_changing_one_target_rebuilds_only_that_target(write_spec, tmp_path):
    spec = write_spec(small_spec(TWO_TARGETS))
    out = tmp_path / "out"
    build(plan_of(spec), out)
    spec.write_text(small_spec(TWO_TARGETS.replace("target b { device = cpu, format = onnx, runs = 3 }",
                                                   "target b { device = cpu, format = onnx, runs = 7 }")))
    results = {r.target: r.cached for r in build(plan_of(spec), out)}
    assert results == {"a": True, "b": False}
    assert json.loads((out / "small" / "b" / "manifest.json").read_text())["target"]["params"]["runs"] == 7
    # A script-only change reuses the lowered, validated artifact.
    assert len(list((out / ".cache" / "lower").iterdir())) == 1


def test_changing_the_format_settings_relowers_but_reuses_the_program(write_spec, tmp_path):
    spec = write_spec(small_spec())
    out = tmp_path / "out"
    build(plan_of(spec), out)
    spec.write_text(small_spec("target cpu { device = cpu, format = onnx, opset = 13, runs = 3 }"))
    (result,) = build(plan_of(spec), out)
    assert not result.cached and result.manifest["artifacts"][0]["opset"] == 13
    assert len(list((out / ".cache" / "lower").iterdir())) == 2
    assert len(list((out / ".cache" / "program").iterdir())) == 1


@pytest.mark.slow
def test_changing_the_model_misses_every_cache(write_spec, tmp_path):
    spec = write_spec(small_spec(TWO_TARGETS))
    out = tmp_path / "out"
    build(plan_of(spec), out)
    spec.write_text(spec.read_text().replace("depth = 2", "depth = 3"))
    results = build(plan_of(spec), out)
    assert [r.cached for r in results] == [False, False]
    assert len(results[0].manifest["params_macs"]["before"]["blocks"]) == 3
    assert len(list((out / ".cache" / "program").iterdir())) == 2


@pytest.mark.slow
def test_force_rebuilds_every_stage_of_an_up_to_date_bundle(write_spec, tmp_path):
    spec = write_spec(small_spec())
    out = tmp_path / "out"
    build(plan_of(spec), out)
    entries = [d / f for d, f in ((next((out / ".cache" / "program").iterdir()), "program.pt"),
                                  (next((out / ".cache" / "lower").iterdir()), "model.onnx"))]
    stamps = [e.stat().st_mtime_ns for e in entries]
    (result,) = build(plan_of(spec), out, force=True)
    assert not result.cached
    assert all(e.stat().st_mtime_ns != s for e, s in zip(entries, stamps))
    assert len(list((out / ".cache" / "program").iterdir())) == 1  # replaced, not added


def test_parity_beyond_tolerance_fails_and_keeps_the_artifact_beside_the_bundle(write_spec, tmp_path):
    out = tmp_path / "out"
    good = write_spec(small_spec())
    build(plan_of(good), out)
    good_manifest = (out / "small" / "cpu" / "manifest.json").read_text()
    strict = write_spec(small_spec("target cpu { device = cpu, format = onnx, tolerance = 1e-12 }"))
    with pytest.raises(BuildError) as caught:
        build(plan_of(strict), out)
    assert caught.value.exit_code == 1
    assert "model.onnx: max abs diff" in str(caught.value) and "exceeds tolerance 1e-12" in str(caught.value)
    failed = out / "small" / "cpu.failed"
    assert (failed / "model.onnx").is_file()
    assert json.loads((failed / "manifest.json").read_text())["failed"]
    # The previous good bundle is untouched, and nothing failed was cached.
    assert (out / "small" / "cpu" / "manifest.json").read_text() == good_manifest
    assert len(list((out / ".cache" / "lower").iterdir())) == 1


@pytest.mark.slow
def test_cli_parity_failure_exits_1_without_a_traceback(write_spec, tmp_path):
    spec = write_spec(small_spec("target cpu { device = cpu, format = onnx, tolerance = 1e-12 }"))
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 1
    assert "failed parity" in done.stderr and "Traceback" not in done.stderr


def _wait_for(predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["terminated", "killed"])
def test_an_interrupted_build_leaves_the_previous_bundle_intact(write_spec, tmp_path, how):
    out = tmp_path / "out"
    spec = write_spec(small_spec())
    build(plan_of(spec), out)
    bundle = out / "small" / "cpu"
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    spec.write_text(small_spec("target cpu { device = cpu, format = onnx, opset = 13 }"))
    lowering = out / ".cache" / "lower"
    process = subprocess.Popen([sys.executable, "-m", "evc", "build", str(spec), "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    # Interrupt it while it lowers: a temporary folder of its own has appeared.
    assert _wait_for(lambda: any(p.name.endswith(".tmp") for p in lowering.iterdir())), "the build never lowered"
    process.send_signal(how)
    process.wait(timeout=60)
    assert process.returncode != 0
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before
    if how == signal.SIGTERM:  # a clean exit removes what it had half-written
        assert not [p for p in out.rglob("*.tmp")]
    (result,) = build(plan_of(spec), out)  # the next build recovers and completes
    assert result.manifest["artifacts"][0]["opset"] == 13
    assert not [p for p in out.rglob("*.tmp")]


def test_validation_runs_on_the_named_data_folder(write_spec, tmp_path):
    write_images(tmp_path / "val", 5, height=40, width=48)
    spec = write_spec(small_spec("target cpu { device = cpu, format = onnx, validate = val }",
                                 extra='data val { images = "val" }\n'))
    (result,) = build(plan_of(spec), tmp_path / "out")
    assert result.manifest["validation"] == {"data": "val", "samples": 5}
    assert result.manifest["artifacts"][0]["parity"]["samples"] == 5


PARALLEL = ('evc 1\nmodel par {\n    source = timm("vit_small_patch16_18x2_224", img_size = 32, patch_size = 8, '
            'depth = 1, embed_dim = 32, num_heads = 4, num_classes = 10)\n    input = image(32, 32)\n}\n'
            'compress {\n    head_prune { keep = 0.5 }\n}\ntarget cpu { device = cpu, format = onnx, runs = 1 }\n')


def test_a_model_evc_does_not_recognise_is_compressed_by_its_groups_end_to_end(write_spec, tmp_path):
    spec = write_spec(PARALLEL, "par.evc")
    (result,) = build(parse_and_check(spec.read_text(), spec), tmp_path / "out")
    assert result.manifest["structure"]["recognised"] is False
    before, after = (result.manifest["params_macs"][k]["total"]["macs"] for k in ("before", "after"))
    assert after < 0.9 * before  # half the heads: their q/k/v rows, projection columns and attention
    assert result.manifest["artifacts"][0]["parity"]["max_abs_diff"] < 1e-4


def test_a_cut_that_breaks_the_model_writes_a_reproducer_and_no_bundle(write_spec, tmp_path, monkeypatch):
    import torch

    from evc.errors import PassFailure
    from evc.passes import grouped

    def wrong(gm, cuts):  # a surgery bug: the cut also scales a weight it should have left alone
        grouped_keep(gm, cuts)
        gm.get_submodule("head").weight.data *= 2

    grouped_keep = grouped.keep_groups
    monkeypatch.setattr(grouped, "keep_groups", wrong)
    spec = write_spec(PARALLEL, "par.evc")
    with pytest.raises(PassFailure, match="cutting pruning group blocks.0.attns.0.attn.qkv: 4 heads of 8 to 2 of 4 "
                                          "changed the model's outputs by max") as e:
        build(parse_and_check(spec.read_text(), spec), tmp_path / "out")
    folder = tmp_path / "out" / "par" / "reproducer"
    assert str(folder) in str(e.value)
    saved = torch.load(folder / "reproducer.pt", weights_only=False)
    assert len(saved["keep"]) == 2
    assert saved["graph"](saved["input"]).shape == (2, 10)
    assert ("blocks.0.attns.0.attn.qkv.weight", 0, 96) in saved["group"]["members"]
    assert "this is evc's bug" in (folder / "README.txt").read_text()
    assert sorted(p.name for p in (tmp_path / "out" / "par").iterdir()) == ["reproducer"]
