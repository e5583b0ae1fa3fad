"""budget: the compress block says the MACs or params, and the search chooses each block's heads and units."""

import json
import re
from fractions import Fraction

import pytest

from evc.cache import Cache
from evc.driver import compile_model
from evc.progress import Progress
from evc.spec.check import parse_and_check
from tests.conftest import ROOT, check_fails, run_evc

DEIT = 'timm("deit_tiny_patch16_224", img_size = 32, patch_size = 8)'  # 12 blocks of 3 heads, MLP 768
PLAIN = 'python("vit:plain_vit_tiny", depth = 4, img_size = 32)'  # plain PyTorch, examples/plain_vit

SPEC = """evc 1
model m {{
    source = {model}
    input  = image(32, 32, crop_pct = 1.0)
}}
data calib {{ synthetic = 16 }}
compress {{
    budget {{ {budget} }}
{passes}
}}
target cpu {{ device = cpu, format = onnx, runs = 2, warmups = 1 }}
"""
SEARCHED = "    head_prune { score = l1 }\n    ffn_prune { score = l1, round_to = 8 }"


def write(folder, budget="macs = 50%", passes=SEARCHED, model=DEIT, data="data = calib, samples = 16"):
    (folder / "vit.py").write_text((ROOT / "examples" / "plain_vit" / "vit.py").read_text())
    path = folder / "m.evc"
    path.write_text(SPEC.format(model=model, budget=", ".join(filter(None, (budget, data))), passes=passes))
    return path


def compiled(path):
    plan = parse_and_check(path.read_text(), path)
    return plan, compile_model(plan, Cache(path.parent / ".cache"), Progress())


@pytest.mark.slow
@pytest.mark.parametrize("model", [DEIT, PLAIN], ids=["deit_tiny", "plain_vit"])
def test_a_macs_budget_is_met_within_2_percent(tmp_path, model):
    plan, result = compiled(write(tmp_path, model=model))
    before, after = result.before["total"]["macs"], result.after["total"]["macs"]
    record = result.budget
    assert record["target"] == pytest.approx(before / 2)
    assert record["reached"] == after  # what was counted is what the passes made
    assert 0.98 * before / 2 <= after <= before / 2
    depth = result.program.structure.depth
    assert [c["pass"] for c in record["chosen"]] == ["head_prune", "ffn_prune"]
    assert all(len(c["keep"]) == depth for c in record["chosen"])
    heads = [b.attn.num_heads for b in result.program.structure.blocks]  # of 3 in both models
    assert heads == [Fraction(k) * 3 for k in record["chosen"][0]["keep"]]


@pytest.mark.slow
def test_a_params_budget_takes_a_count(tmp_path):
    plan, result = compiled(write(tmp_path, budget="params = 1.2M", model=PLAIN))
    assert result.before["total"]["params"] > 1.7e6
    assert 0.98 * 1.2e6 <= result.after["total"]["params"] <= 1.2e6
    assert result.budget["metric"] == "params"


@pytest.mark.slow
def test_a_key_the_spec_fixes_stays_fixed(tmp_path):
    passes = "    head_prune { keep = 2/3 }\n    ffn_prune { score = l1 }"
    plan, result = compiled(write(tmp_path, passes=passes, model=PLAIN))
    assert [b.attn.num_heads for b in result.program.structure.blocks] == [2] * 4
    assert [c["pass"] for c in result.budget["chosen"]] == ["ffn_prune"]
    before = result.before["total"]["macs"]
    assert 0.98 * before / 2 <= result.after["total"]["macs"] <= before / 2


@pytest.mark.slow
def test_the_chosen_fragment_pasted_in_the_spec_rebuilds_the_same_model_without_searching(tmp_path):
    path = write(tmp_path, model=PLAIN)
    done = run_evc("explain", path, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    fragment = re.findall(r"^    ((?:head|ffn)_prune \{ keep = \[.*\] \})$", done.stdout, re.M)
    assert len(fragment) == 2
    pinned = tmp_path / "pinned"
    pinned.mkdir()
    passes = "\n".join("    " + f.replace("{ keep", "{ score = l1, keep") for f in fragment)
    plain = SPEC.replace("    budget {{ {budget} }}\n", "").format(model=PLAIN, passes=passes)
    (pinned / "vit.py").write_text((ROOT / "examples" / "plain_vit" / "vit.py").read_text())
    (pinned / "m.evc").write_text(plain)
    _, searched = compiled(path)
    _, written = compiled(pinned / "m.evc")
    assert written.budget is None  # no search ran
    assert written.after == searched.after


@pytest.mark.slow
def test_a_lock_file_repeats_the_choice_without_searching(tmp_path):
    path = write(tmp_path, model=PLAIN)
    done = run_evc("build", path, "--out", tmp_path / "out", "--pin")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"pinned: {path}.lock"
    lock = json.loads((tmp_path / "m.evc.lock").read_text())
    first = json.loads((tmp_path / "out" / "m" / "cpu" / "manifest.json").read_text())
    again = run_evc("build", path, "--out", tmp_path / "out", "--force")  # the cache gone: only the lock is left
    assert again.returncode == 0, again.stderr
    second = json.loads((tmp_path / "out" / "m" / "cpu" / "manifest.json").read_text())
    assert second["budget"]["pinned"] == "m.evc.lock" and "sensitivity" not in again.stderr
    assert second["budget"]["chosen"] == first["budget"]["chosen"] == lock["budget"]["chosen"]
    assert second["params_macs"]["after"] == first["params_macs"]["after"]
    path.write_text(path.read_text().replace("macs = 50%", "macs = 40%"))  # another budget: the lock is not its
    assert parse_and_check(path.read_text(), path).budget.params["macs"] == ("share", 0.4)
    _, result = compiled(path)
    assert "pinned" not in result.budget and result.budget["target"] < lock["budget"]["target"]


@pytest.mark.slow
def test_a_budget_chooses_which_sublayers_block_skip_removes(tmp_path):
    passes = "    block_skip { part = attn }\n    ffn_prune { score = l1, round_to = 8 }"
    path = write(tmp_path, budget="macs = 60%", passes=passes, model=PLAIN)
    plan, result = compiled(path)
    before, after = result.before["total"]["macs"], result.after["total"]["macs"]
    assert 0.98 * 0.6 * before <= after <= 0.6 * before
    skip, ffn = result.budget["chosen"]
    assert skip["pass"] == "block_skip" and set(skip) == {"pass", "index", "attn"}
    assert skip["attn"], "at 60% the cheapest saving includes an attention sublayer"
    assert [b.index for b in result.program.structure.blocks if b.attn is None] == skip["attn"]
    assert any(b.attn is not None for b in result.program.structure.blocks)
    # the fragment `evc explain` prints, pasted in place of the budget, builds the same model
    text = re.sub(r"    budget \{.*\}\n", "", path.read_text())
    text = text.replace("block_skip { part = attn }", f"block_skip {{ attn = [{', '.join(map(str, skip['attn']))}] }}")
    text = text.replace("round_to = 8 }", f"round_to = 8, keep = [{', '.join(ffn['keep'])}] }}")
    path.write_text(text)
    _, written = compiled(path)
    assert written.budget is None and written.after == result.after


@pytest.mark.slow
def test_a_budget_chooses_the_patches_patch_slim_keeps(tmp_path):
    passes = "    patch_slim { }\n    ffn_prune { score = l1, round_to = 8 }"
    model = 'timm("deit_tiny_patch16_224", img_size = 64, patch_size = 8, depth = 6)'  # 64 patches
    path = write(tmp_path, budget="macs = 50%", passes=passes, model=model)
    path.write_text(path.read_text().replace("image(32, 32", "image(64, 64"))
    plan, result = compiled(path)
    before, after = result.before["total"]["macs"], result.after["total"]["macs"]
    assert 0.97 * before / 2 <= after <= before / 2  # a step is an eighth of a block's patches: coarser
    slim = result.budget["chosen"][0]
    assert slim["pass"] == "patch_slim" and slim["keep"][0] == "1"
    shares = [Fraction(k) for k in slim["keep"]]
    assert all(s in {Fraction(k, 8) for k in range(2, 9)} for s in shares)
    tokens = [b["tokens"] for b in result.after["blocks"]]
    assert tokens == sorted(tokens, reverse=True) and tokens[-1] < tokens[0], tokens
    patches, first = 64, result.before["blocks"][0]["tokens"]  # 64x64 in patches of 8, and the class token
    assert first == patches + 1
    for block, share in enumerate(shares):  # each block keeps its share of the patches entering it
        if block:
            entering = tokens[block - 1] - 1
            assert tokens[block] - 1 == min(entering, max(0, int(share * entering + Fraction(1, 2))))


def test_a_latency_budget_does_not_choose_what_its_table_cannot_price(tmp_path):
    path = write(tmp_path, budget="latency = 50%, on = cpu", passes="    patch_slim { }\n" + SEARCHED)
    stderr = check_fails(path)
    assert "a latency budget cannot choose patch_slim's keep yet" in stderr and "m.evc:9:5" in stderr


@pytest.mark.slow
def test_an_impossible_budget_is_bad_input_naming_the_floor(tmp_path):
    path = write(tmp_path, budget="macs = 5%", model=PLAIN)
    done = run_evc("build", path, "--out", tmp_path / "out")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert re.search(rf"{re.escape(str(path))}:8:\d+: .*budget: macs = [\d.]+[KM] cannot be met: the searched passes "
                     r"reach [\d.]+M at the least", done.stderr), done.stderr
    assert not (tmp_path / "out" / "m").exists()


@pytest.mark.parametrize("budget, passes, message", [
    ("", SEARCHED, "a budget needs `macs`, `params` or `latency`"),
    ("macs = 50%, params = 50%", SEARCHED, "give either `macs` or `params`"),
    ("macs = 12ms", SEARCHED, "found 12ms, a time"),
    ("macs = 50%", "    head_prune { keep = 1/2 }", "the budget has nothing to choose"),
    ("macs = 50%", "    head_prune { scope = global }", "scope = global ranks all heads together"),
])
def test_a_budget_that_cannot_mean_anything_is_a_spec_error(tmp_path, budget, passes, message):
    stderr = check_fails(write(tmp_path, budget=budget, passes=passes))
    assert message in stderr and "m.evc:" in stderr


def test_without_a_budget_keep_is_still_required(tmp_path):
    path = tmp_path / "m.evc"
    path.write_text(SPEC.replace("    budget {{ {budget} }}\n", "").format(model=DEIT, passes=SEARCHED))
    assert "missing required key 'keep'" in check_fails(path)
