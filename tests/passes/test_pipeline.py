"""The structural passes inside a build: specs, ONNX parity, the cache, explain, per-layer errors."""


import onnx
import pytest

from evc.driver import build
from evc.registry import PASSES
from evc.spec.check import parse_and_check
from tests.conftest import run_evc, small_spec, write_images

COMPRESS = """compress {
    head_prune { keep = 2/3, score = taylor, data = calib }
    ffn_prune  { keep = 50%, score = activation, data = calib }
    block_skip { count = 1, part = attn, data = calib }
}
"""
CALIB = "data calib { synthetic = 8 }\n"


@pytest.mark.slow
def test_compressed_model_exports_smaller_with_parity(write_spec, tmp_path):
    plain = write_spec(small_spec(), "plain.evc")
    compressed = write_spec(small_spec(extra=CALIB + COMPRESS), "small.evc")
    (before,) = build(parse_and_check(plain.read_text(), plain), tmp_path / "out")
    (after,) = build(parse_and_check(compressed.read_text(), compressed), tmp_path / "out")
    blocks = after.manifest["structure"]["blocks"]
    assert sum(b["attn"] is None for b in blocks) == 1
    assert {b["attn"]["num_heads"] for b in blocks if b["attn"]} == {2}
    assert {b["mlp"]["hidden"] for b in blocks} == {384}
    assert after.manifest["artifacts"][0]["parity"]["max_abs_diff"] < 1e-4
    assert after.manifest["artifacts"][0]["size"] < 0.6 * before.manifest["artifacts"][0]["size"]
    model = onnx.load(str(after.bundle / "model.onnx"))
    initializers = {i.name: tuple(i.dims) for i in model.graph.initializer}
    assert (384, 192) in initializers.values() or (192, 384) in initializers.values()  # fc1/fc2 really shrank
    assert after.manifest["passes"][0] == {"name": "head_prune", "params": {
        "keep": 2 / 3, "score": "taylor", "scope": "layer", "min_heads": 1, "data": "calib"}}


def test_the_pruned_model_is_reloaded_from_the_cache_without_rerunning_passes(write_spec, tmp_path, monkeypatch):
    spec = write_spec(small_spec(extra=CALIB + COMPRESS,
                                 targets="target a { device = cpu, format = onnx }"))
    out = tmp_path / "out"
    build(parse_and_check(spec.read_text(), spec), out)
    calls = []
    for name in ("head_prune", "ffn_prune", "block_skip"):
        plugin = PASSES[name].plugin
        monkeypatch.setattr(plugin, "run", lambda *a, n=name, r=plugin.run: calls.append(n) or r(*a))
    # A new target needs the compressed program again: it comes from the cache.
    spec.write_text(spec.read_text() + "target b { device = cpu, format = onnx, opset = 13 }\n")
    results = build(parse_and_check(spec.read_text(), spec), out)
    assert [r.cached for r in results] == [True, False]
    assert calls == []
    assert results[1].manifest["structure"] == results[0].manifest["structure"]
    assert results[1].manifest["artifacts"][0]["parity"]["max_abs_diff"] < 1e-4


@pytest.mark.slow
def test_explain_shows_heads_hidden_and_skipped_parts_before_and_after(write_spec, tmp_path):
    spec = write_spec(small_spec(extra=CALIB + "compress {\n    head_prune { keep = 2/3 }\n"
                                 "    ffn_prune { keep = 0.5 }\n    block_skip { mlp = [1] }\n}\n"))
    done = run_evc("explain", spec, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in done.stdout.splitlines() if line.count("│") > 3}
    assert rows["0"][:4] == ["17", "3 → 2", "768 → 384", ""]
    assert rows["1"][:4] == ["17", "3 → 2", "768 → 0", "mlp"]
    assert "→" in rows["total"][-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_per_layer_list_of_the_wrong_length_names_the_depth(write_spec, tmp_path):
    spec = write_spec(small_spec(extra="compress {\n    head_prune { keep = [1, 0.5, 0.5] }\n}\n"))
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 2
    assert f"{spec}:7:25: error: head_prune: keep: expected one value per block: the model has depth 2, " \
           "this list has 3" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_block_to_skip_beyond_the_depth_points_at_its_key(write_spec, tmp_path):
    spec = write_spec(small_spec(extra="compress {\n    block_skip { attn = [0, 5] }\n}\n"))
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 2
    assert ":7:25: error: block_skip: attn: block 5 does not exist: the model has depth 2" in done.stderr


@pytest.mark.slow
def test_changing_the_images_a_pass_scores_on_reruns_the_passes(write_spec, tmp_path):
    folder = write_images(tmp_path / "calib", 4)
    spec = write_spec(small_spec(extra='data calib { images = "calib" }\n'
                                       "compress {\n    head_prune { keep = 2/3, score = taylor, data = calib }\n}\n"))
    out = tmp_path / "out"
    build(parse_and_check(spec.read_text(), spec), out)
    write_images(folder, 1, seed=1)
    (result,) = build(parse_and_check(spec.read_text(), spec), out)
    assert not result.cached
    # one loaded model, and a compressed one for each set of calibration images
    assert len(list((out / ".cache" / "program").iterdir())) == 3
