"""`evc explain`: the model as loaded, the passes as written, before → after; from the build cache when it
holds the compressed program; `--json`."""

import json
import sys

import pytest

from evc.driver import build
from evc.spec.check import parse_and_check
from evc.spec.params import Int, Param
from evc.tools.explain import explain_record
from tests.conftest import run_evc, small_spec

PASSES = "compress {\n    head_prune { keep = 2/3, score = l1 }\n    ffn_prune  { keep = 70% }\n}\n"
X5 = ("data calib { synthetic = 8 }\n"
      "target x5 { device = rdk_x5, format = bpu, calibrate = calib }")

# `evc explain` in a process where importing torch fails: it succeeds only if nothing loads a model.
WITHOUT_TORCH = ("import sys; sys.modules['torch'] = None; from evc.cli import main; "
                 "sys.exit(main(sys.argv[1:]))")


def explain_without_torch(*args):
    import subprocess

    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "explain", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
def test_explain_shows_the_model_as_loaded_then_the_passes_as_written_then_before_and_after(write_spec, tmp_path):
    done = run_evc("explain", write_spec(small_spec(extra=PASSES)), "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    # as loaded: vit_tiny's 3 heads and 768 MLP units, not what the passes leave
    assert "block 0: attn 3x64, mlp 768, 17 tokens" in text and "attn 2x64" not in text
    assert "pass head_prune { keep = 2/3, score = l1 }" in text and "pass ffn_prune { keep = 70% }" in text
    assert "defaults: scope = layer, min_heads = 1" in text and "defaults: score = l1, round_to = 8" in text
    assert "0.666" not in text and "None" not in text and "data =" not in text
    assert text.index("as loaded:") < text.index("pass head_prune") < text.index("before → after")
    row = next(line for line in text.splitlines() if line.strip("│┃ ").startswith("0 "))
    assert "3 → 2" in row and "768 → 536" in row
    assert not (tmp_path / "out").exists()
    assert "from the build cache" not in done.stderr


@pytest.mark.slow
def test_explain_json_is_one_document_with_the_passes_as_written(write_spec, tmp_path):
    done = run_evc("explain", write_spec(small_spec(extra=PASSES)), "--out", tmp_path / "out", "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["schema"] == "evc.explain/1" and record["cached"] is False
    assert record["model"]["input"] == [1, 3, 32, 32]
    assert [b["attn"]["num_heads"] for b in record["model"]["structure"]["blocks"]] == [3, 3]
    assert [b["attn"]["num_heads"] for b in record["compressed"]["structure"]["blocks"]] == [2, 2]
    assert record["passes"][0]["written"] == {"keep": "2/3", "score": "l1"}
    assert record["passes"][1]["written"] == {"keep": "70%"}
    assert [(b["heads"], b["hidden"], b["tokens"]) for b in record["blocks"]] == [([3, 2], [768, 536], [17, 17])] * 2
    assert record["after"]["total"]["macs"] < record["before"]["total"]["macs"]
    assert record["targets"][0]["written"] == {"runs": "3", "warmups": "1"}


def test_explain_after_a_build_reads_the_cache_and_runs_no_pass(registered_pass, write_spec, tmp_path):
    """A pass that counts its runs: the build runs it once, an explain after the build not at all."""
    runs = []

    def counted(program, params, ctx):
        """Count each run; leave the model as it is."""
        runs.append(params["n"])
        return program

    registered_pass("counted", counted, Param("n", Int(0), 0, "any number"))
    spec = write_spec(small_spec(extra="compress {\n    counted { n = 7 }\n}\n"))
    plan = parse_and_check(spec.read_text(), spec)
    out = tmp_path / "out"
    assert explain_record(plan, out)["cached"] is False and runs == [7]  # nothing cached: the pass runs
    assert not out.exists()
    build(plan, out)
    assert runs == [7, 7]
    record = explain_record(plan, out)
    assert record["cached"] is True and runs == [7, 7]
    assert record["passes"] == [{"name": "counted", "written": {"n": "7"}, "defaults": {}, "found": {}}]


@pytest.mark.slow
def test_explain_from_the_cache_never_imports_torch_and_shows_the_same(write_spec, tmp_path):
    spec = write_spec(small_spec(extra=PASSES))
    out = tmp_path / "out"
    fresh = run_evc("explain", spec, "--out", out, "--json")
    assert explain_without_torch(spec, "--out", out).returncode != 0  # no cache yet: it needs torch
    assert run_evc("build", spec, "--out", out).returncode == 0
    done = explain_without_torch(spec, "--out", out, "--json")
    assert done.returncode == 0, done.stderr
    cached = json.loads(done.stdout)
    assert cached["cached"] is True and "from the build cache" in done.stderr
    assert {**json.loads(fresh.stdout), "cached": True} == cached


@pytest.mark.slow
def test_an_x5_targets_operator_check_comes_from_the_cached_lowering(write_spec, tmp_path):
    spec = write_spec(small_spec(targets=X5, extra=PASSES))
    out = tmp_path / "out"
    assert run_evc("build", spec, "--out", out).returncode == 0
    done = explain_without_torch(spec, "--out", out, "--json")
    assert done.returncode == 0, done.stderr
    placement = json.loads(done.stdout)["targets"][0]["placement"]
    manifest = json.loads((out / "small" / "x5" / "manifest.json").read_text())
    assert placement == manifest["artifacts"][0]["op_check"] and placement["summary"]
    text = explain_without_torch(spec, "--out", out).stdout
    assert "operator check" in text
