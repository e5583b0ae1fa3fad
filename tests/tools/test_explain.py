"""`evc explain`: the model as loaded, the passes as written, before → after; from the build cache when it
holds the compressed program; `--json`."""

import io
import json
import sys

import pytest
from rich.console import Console

from evc.cache import Cache
from evc.driver import build, compile_model
from evc.ir.capture import fetch, store
from evc.progress import Progress
from evc.spec.check import parse_and_check
from evc.spec.params import Int, Param
from evc.tools.explain import explain, explain_record
from tests.conftest import run_evc, small_spec

PASSES = "compress {\n    head_prune { keep = 2/3, score = l1 }\n    ffn_prune  { keep = 70% }\n}\n"
X5 = ("data calib { synthetic = 8 }\n"
      "target x5 { device = rdk_x5, format = bpu, calibrate = calib }")

# `evc explain` in a process where importing torch fails: it succeeds only if nothing loads a model.
WITHOUT_TORCH = ("import sys; sys.modules['torch'] = None; from evc.cli import main; "
                 "sys.exit(main(sys.argv[1:]))")


# Two blocks whose MLPs pass torch.cumsum, an op with no rule for its channels: their hidden units are frozen.
CUMSUM_NET = """\
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.fc2(torch.cumsum(self.fc1(self.norm(x)), dim=-1))


class CumsumNet(nn.Module):
    def __init__(self, dim=16, depth=2, classes=10):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 8, stride=8)
        self.blocks = nn.Sequential(*(Block(dim) for _ in range(depth)))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x).flatten(2).transpose(1, 2)).mean(1))
"""


def cumsum_spec(write_spec):
    """A spec naming CumsumNet, in a Python file beside it."""
    spec = write_spec('evc 1\nmodel net {\n    source = python("cumsum_net:CumsumNet")\n    input = image(32, 32)\n}\n'
                      "target cpu { device = cpu, format = onnx, runs = 3, warmups = 1 }\n", "net.evc")
    (spec.parent / "cumsum_net.py").write_text(CUMSUM_NET)
    return spec


def explained(spec, out):
    """`evc explain` run in this process: its record, and its text."""
    console = Console(file=io.StringIO(), width=200)
    record = explain(parse_and_check(spec.read_text(), spec), out, console)
    return record, console.file.getvalue()


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


def test_explain_counts_the_pruning_groups_and_folds_a_frozen_group_repeated_per_block(write_spec, tmp_path):
    record, text = explained(write_spec(small_spec()), tmp_path / "out")
    groups = record["model"]["groups"]
    assert groups["heads"] == {"groups": 2, "heads": 6} and groups["units"] == {"groups": 2, "units": 1536}
    assert groups["streams"] == [192] and groups["head_dim"]["groups"] == 0
    assert "Pruning groups: 2 heads groups (6 heads), 2 units groups (1536 units), 1 stream (192, left alone)" in text
    assert text.index("as loaded:") < text.index("Pruning groups:") < text.index("Frozen (not pruned):")
    # each block's head_dim, frozen by its own sdpa node: one line, the first block's node, ×2
    sdpa = [g for g in groups["frozen"] if "'scaled_dot_product_attention" in g["reason"]]
    assert [(g["width"], g["members"][0]) for g in sdpa] == [(64, "blocks.0.attn.qkv.weight"),
                                                             (64, "blocks.1.attn.qkv.weight")]
    (line,) = [line for line in text.splitlines() if "scaled_dot_product_attention" in line]
    assert "node 'scaled_dot_product_attention' " in line and "×2: 64 channels of blocks.0.attn.qkv.weight" in line
    assert "it reaches the model's output at node 'head': 10 channels of head.weight, head.bias" in text


def test_explain_lists_the_units_an_op_without_a_rule_freezes_naming_its_node(write_spec, tmp_path):
    record, text = explained(cumsum_spec(write_spec), tmp_path / "out")
    groups = record["model"]["groups"]
    assert groups["units"]["groups"] == 0 and groups["streams"] == [16]
    # what enters each cumsum and what leaves it: two groups of 64 per block
    cumsum = [g for g in groups["frozen"] if "cumsum" in g["reason"]]
    assert [(g["reason"], g["width"]) for g in cumsum] == [
        ("node 'cumsum' (cumsum) has no rule for its channels", 64)] * 2 + [
        ("node 'cumsum_1' (cumsum) has no rule for its channels", 64)] * 2
    assert cumsum[0]["members"] == ["blocks.0.fc1.weight", "blocks.0.fc1.bias"]
    assert "Pruning groups: 1 stream (16, left alone)\nFrozen (not pruned):\n" in text
    assert "  node 'cumsum' (cumsum) has no rule for its channels ×4: 64 channels of blocks.0.fc1.weight" in text
    assert "cumsum_1" not in text


def test_an_analysis_of_the_groups_that_fails_leaves_explain_whole(write_spec, tmp_path, monkeypatch):
    def fails(gm):
        raise RuntimeError("no rule")

    monkeypatch.setattr("evc.ir.groups.channel_groups", fails)
    record, text = explained(write_spec(small_spec()), tmp_path / "out")
    assert record["model"]["groups"] is None and record["model"]["structure"] is not None
    assert "block 0: attn 3x64" in text and "Pruning groups" not in text


def test_explain_reads_a_cached_program_stored_before_groups_were_kept(write_spec, tmp_path):
    spec, out = write_spec(small_spec(extra=PASSES)), tmp_path / "out"
    cache = Cache(out / ".cache")
    compile_model(parse_and_check(spec.read_text(), spec), cache, Progress())
    for entry in list((out / ".cache" / "program").iterdir()):  # the model as loaded, and as the passes left it
        stored = fetch(cache, entry.name)
        del stored.loaded["groups"], stored.view["groups"]
        store(cache, entry.name, stored)
    record, text = explained(spec, out)
    assert record["cached"] is True and record["model"]["groups"] is None
    assert "block 0: attn 3x64" in text and "Pruning groups" not in text
