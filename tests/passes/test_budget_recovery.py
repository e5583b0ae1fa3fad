"""A budget judged after recovery: candidate allocations, uniform ratios always among them, each trained briefly
by the finetune that follows and scored on held-back images; another allocation wins only by leading uniform
ratios by more than a bar of standard errors that rises with the rivals, and `--pin` repeats it."""

import json

import pytest

from evc.passes.recovery import Candidate, Split, bar, winner
from evc.passes.train import Recipe, Run
from tests.conftest import check_fails, run_evc

SPEC = """evc 1
model m {{
    source  = timm("vit_tiny_patch16_224", img_size = 32, patch_size = 8, depth = 4, embed_dim = 96,
                   num_heads = 3, num_classes = 10)
    input   = image(32, 32, mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225], crop_pct = 1.0)
    weights = "{weights}"
}}
data train {{ images = "{digits}/train" }}
data val   {{ images = "{digits}/val" }}
compress {{
    budget     {{ macs = 50%, data = train, samples = 16{budget} }}
    head_prune {{ score = l1 }}
    ffn_prune  {{ score = l1, round_to = 8 }}
{finetune}}}
target cpu {{ device = cpu, format = onnx, runs = 2, warmups = 1 }}
"""
FINETUNE = "    finetune   { data = train, epochs = 2, lr = 1e-3, batch = 64, augment = none }\n"
ON_CPU = FINETUNE.replace("augment = none", "augment = none, device = cpu")  # a GPU judges one at a time


@pytest.fixture(scope="module")
def untrained(digits, tmp_path_factory):
    """The digits (tests/conftest.py) and the spec's ViT saved untrained: enough to check a spec."""
    import prepare

    folder = tmp_path_factory.mktemp("untrained")
    prepare.save_file(_vit().state_dict(), folder / "vit.safetensors")
    return digits, folder


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """The ViT trained on the digits for a few epochs: a teacher whose judged loss means something."""
    import prepare

    model = _vit()
    images, labels = prepare.read_folder(digits / "train")
    prepare.train(model, images, labels, epochs=10)
    folder = tmp_path_factory.mktemp("trained")
    prepare.save_file(model.state_dict(), folder / "vit.safetensors")
    return digits, folder


@pytest.fixture(scope="module")
def built(trained, tmp_path_factory):
    """One build of the trained ViT judged in one process and pinned, which the tests of its manifest, explain,
    `--pin` and worker processes share: (the spec, the build's output folder, the finished build)."""
    folder = tmp_path_factory.mktemp("built")
    spec = write(folder, trained, ", steps = 4, workers = 1", ON_CPU)
    done = run_evc("build", spec, "--out", folder / "out", "--pin")
    assert done.returncode == 0, done.stderr
    return spec, folder / "out", done


def _vit():
    import timm

    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, embed_dim=96, num_heads=3,
                             num_classes=10)


def write(folder, model, budget="", finetune=FINETUNE):
    """The spec in `folder`, for `model`: (the digits' folder, the folder of its weights)."""
    digits, weights = model
    path = folder / "m.evc"
    path.write_text(SPEC.format(weights=weights / "vit.safetensors", digits=digits, budget=budget,
                                finetune=finetune))
    return path


def manifest(out):
    return json.loads((out / "m" / "cpu" / "manifest.json").read_text())


@pytest.mark.slow
def test_uniform_is_always_judged_and_the_winner_never_measured_worse_than_it(built):
    _, out, done = built
    budget = manifest(out)["budget"]
    judge = budget["judge"]
    assert judge["by"] == "recovery" and judge["pass"] == "finetune" and judge["steps"] == 4
    names = [c["name"] for c in judge["candidates"]]
    assert names[:2] == ["uniform", "sensitivity"] and {"early wider", "late wider", "learned"} <= set(names)
    assert judge["images"] == pytest.approx(0.2 * 1438, abs=10)  # a fifth of each class of train
    assert judge["on"] == "images held back from the finetune's"
    losses = {c["name"]: c["loss"] for c in judge["candidates"]}
    assert all(loss is not None and loss > 0 for loss in losses.values())
    ranked = sorted(judge["candidates"], key=lambda c: (-c["top1"], c["loss"], c["name"] != "uniform"))
    alike = [c for c in ranked if c["name"] == "uniform" or c["name"].endswith("rest uniform")]
    assert judge["baseline"] == alike[0]["name"]  # the best ranked of uniform ratios
    baseline = alike[0]
    assert baseline["lead"] == 0 and baseline["se"] == 0
    winner = next(c for c in judge["candidates"] if c["name"] == judge["winner"])
    above = ranked[:ranked.index(baseline)]
    rivals = sum(not (c["name"] == "uniform" or c["name"].endswith("rest uniform")) for c in ranked)
    assert judge["bar"] == pytest.approx(bar(rivals), abs=1e-3) and judge["bar"] > 1.5  # sensitivity, tapers, learned
    if winner is baseline:  # nothing ranked above uniform ratios led them by more than the bar
        assert all(c["lead"] <= judge["bar"] * c["se"] for c in above)
    else:  # the first ranked that did
        assert winner == next(c for c in above if c["lead"] > judge["bar"] * c["se"])
        assert winner["top1"] - baseline["top1"] == pytest.approx(winner["lead"], abs=1e-5)
    assert (winner["top1"], -winner["loss"]) >= (baseline["top1"], -baseline["loss"])
    for c in judge["candidates"]:  # every candidate met the budget, by a count
        assert c["count"] <= budget["target"]
    assert budget["chosen"] == winner["chosen"] and budget["reached"] == winner["count"]
    shares = {c["name"]: c["chosen"][0]["keep"] for c in judge["candidates"]}
    assert len(set(shares["uniform"])) == 1  # one share of the heads in every block
    uniform = next(c for c in judge["candidates"] if c["name"] == "uniform")
    assert f"  uniform: top-1 {uniform['top1']:.2%}, loss {uniform['loss']:.4f}" in done.stderr  # progress


@pytest.mark.slow
def test_refine_judges_the_best_uniform_ratios_and_their_neighbours_after_longer_training(tmp_path, trained):
    from fractions import Fraction

    spec = write(tmp_path, trained, ", steps = 2, refine = 6")
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    budget = manifest(tmp_path / "out")["budget"]
    judge = budget["judge"]
    (first,) = judge["earlier_rounds"]
    assert first["steps"] == 2 and judge["steps"] == 6
    named = {c["name"]: c for c in first["candidates"]}
    start, *rivals = judge["candidates"]
    assert start["name"] == first["baseline"] and start["chosen"] == named[first["baseline"]]["chosen"]

    def keeps(candidate):
        return {e["pass"]: [Fraction(k) for k in e["keep"]] for e in candidate["chosen"]}

    heads, units = keeps(start)["head_prune"], keeps(start)["ffn_prune"]
    neighbours = [c for c in rivals if c["name"] != first["winner"]]
    assert len(neighbours) >= 4  # one block's heads one fewer or one more, where it can take it
    for c in neighbours:
        moved = [(b, k - h) for b, (h, k) in enumerate(zip(heads, keeps(c)["head_prune"])) if k != h]
        (block, step), = moved
        assert c["name"] == f"head_prune block {block} {round(3 * step):+d}" and abs(step) == Fraction(1, 3)
        assert len(set(keeps(c)["ffn_prune"])) == 1 and keeps(c)["ffn_prune"] != units  # the MLPs rebisected
        assert c["count"] <= budget["target"] and c["loss"] is not None
    winner = next(c for c in judge["candidates"] if c["name"] == judge["winner"])
    assert (winner["top1"], -winner["loss"]) >= (start["top1"], -start["loss"])  # never worse than uniform ratios
    assert judge["bar"] == pytest.approx(bar(len(rivals)), abs=1e-3)
    assert budget["chosen"] == winner["chosen"]
    said = run_evc("explain", spec, "--out", tmp_path / "out").stdout
    assert f"then {first['baseline']}, the best alike in every block, and its neighbours, each after 6 steps" in said
    assert "judged after 2 steps" in said and f"head_prune block {block} {round(3 * step):+d}" in said


@pytest.mark.slow
def test_candidates_are_judged_on_the_data_the_budget_names_the_model_never_trained_on(tmp_path, trained):
    done = run_evc("build", write(tmp_path, trained, ", steps = 4, judge_data = val"), "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    judge = manifest(tmp_path / "out")["budget"]["judge"]
    assert judge["on"] == "images of data 'val'" and judge["images"] == 359
    winner = next(c for c in judge["candidates"] if c["name"] == judge["winner"])
    ahead = [c for c in judge["candidates"] if c["top1"] > winner["top1"]]
    if ahead:  # the most right, unless uniform ratios were kept for want of a clear lead
        assert judge["winner"] == judge["baseline"]
        assert all(c["lead"] <= judge["bar"] * c["se"] for c in ahead)
    assert all(round(c["top1"] * 359) == pytest.approx(c["top1"] * 359, abs=1e-3) for c in judge["candidates"])


@pytest.mark.slow
def test_explain_and_the_report_say_why_the_winner_beat_uniform_with_the_numbers(built):
    spec, out, _ = built
    done = run_evc("explain", spec, "--out", out)
    assert done.returncode == 0, done.stderr
    judge = manifest(out)["budget"]["judge"]
    uniform = next(c for c in judge["candidates"] if c["name"] == "uniform")
    assert "judged after 4 steps of finetune's recipe" in done.stdout
    assert f"loss {uniform['loss']:.4f}" in done.stdout
    page = (out / "m" / "report.html").read_text()  # the report's table of the same candidates
    table = page[page.index('<table id="budget-candidates">'):]
    table = table[:table.index("</table>")]
    assert table.count("<tr") == 1 + len(judge["candidates"]) and f"{uniform['loss']:.4f}" in table
    assert f"{judge['winner']} (chosen)" in table
    baseline = next(c for c in judge["candidates"] if c["name"] == judge["baseline"])
    winner = next(c for c in judge["candidates"] if c["name"] == judge["winner"])
    assert f"lead {100 * winner['lead']:+.2f} points (standard error {100 * winner['se']:.2f})" in done.stdout
    assert "lead over uniform (standard error)" in table
    if winner is baseline:
        assert f"kept: no other allocation led them by more than {judge['bar']:.2f} standard errors" in done.stdout
        nearest = max((c for c in judge["candidates"] if c is not baseline), key=lambda c: c["lead"])
        assert (f"; the nearest, {nearest['name']}, led by" if nearest["lead"] > 0 else
                f"; none led them at all: the nearest, {nearest['name']}, was") in done.stdout
    else:
        assert f"{judge['winner']} beat uniform ratios" in done.stdout
        assert f"top-1 {winner['top1']:.2%} against {baseline['top1']:.2%}, a lead of" in done.stdout


@pytest.mark.slow
def test_the_learned_gates_cut_the_mlps_that_add_nothing_first(tmp_path, trained):
    from fractions import Fraction

    import prepare
    from safetensors.torch import load_file

    digits, folder = trained
    state = load_file(folder / "vit.safetensors")
    for block in (2, 3):  # these MLPs add nothing to the residual stream: every unit's gate is worth nothing
        state[f"blocks.{block}.mlp.fc2.weight"].zero_()
        state[f"blocks.{block}.mlp.fc2.bias"].zero_()
    (tmp_path / "idle").mkdir()
    prepare.save_file(state, tmp_path / "idle" / "vit.safetensors")
    done = run_evc("build", write(tmp_path, (digits, tmp_path / "idle"), ", steps = 2"), "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    budget = manifest(tmp_path / "out")["budget"]
    learned = next(c for c in budget["judge"]["candidates"] if c["name"] == "learned")
    assert learned["count"] <= budget["target"] and learned["loss"] is not None
    keep = [Fraction(k) for k in next(e for e in learned["chosen"] if e["pass"] == "ffn_prune")["keep"]]
    assert keep[2] == keep[3] == Fraction(8, 384) < min(keep[0], keep[1])  # down to round_to, before any other


@pytest.mark.slow
def test_pin_repeats_the_judged_choice_without_judging_again(tmp_path, built):
    spec, out, _ = built
    assert spec.with_name("m.evc.lock").is_file()
    chosen = manifest(out)["budget"]["chosen"]
    again = run_evc("build", spec, "--out", tmp_path / "again")
    assert again.returncode == 0, again.stderr
    pinned = manifest(tmp_path / "again")["budget"]
    assert pinned["pinned"] == "m.evc.lock" and pinned["chosen"] == chosen
    assert "  uniform: top-1" not in again.stderr  # no candidate trained
    assert manifest(tmp_path / "again")["params_macs"]["after"] == manifest(out)["params_macs"]["after"]


@pytest.mark.slow
def test_past_the_time_limit_only_uniform_and_the_sensitivity_allocation_are_judged(tmp_path, trained):
    done = run_evc("build", write(tmp_path, trained, ", steps = 2, time = 1ms"), "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    judge = manifest(tmp_path / "out")["budget"]["judge"]
    judged = [c["name"] for c in judge["candidates"] if c["loss"] is not None]
    assert judged == ["uniform", "sensitivity"] and judge["left_out"]
    assert judge["winner"] in judged
    assert "time = 0.001s is spent" in done.stderr


@pytest.mark.slow
def test_candidates_judged_in_two_worker_processes_score_as_one_process_does(tmp_path, trained, built):
    two = run_evc("build", write(tmp_path, trained, ", steps = 4, workers = 2", ON_CPU), "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    a, b = manifest(built[1])["budget"]["judge"], manifest(tmp_path / "two")["budget"]["judge"]
    assert a["workers"] == 1 and b["workers"] == 2
    assert [c["name"] for c in a["candidates"]] == [c["name"] for c in b["candidates"]]
    for x, y in zip(a["candidates"], b["candidates"]):  # threads differ, so float sums may: not the training
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-3) and x["top1"] == y["top1"]


def test_without_a_finetune_the_budget_judges_by_divergence(tmp_path, untrained):
    from evc.spec.check import parse_and_check
    from evc.spec.plan import recovering

    plan = parse_and_check(write(tmp_path, untrained, finetune="").read_text(), tmp_path / "m.evc")
    assert recovering(plan.passes) is None
    plan = parse_and_check(write(tmp_path, untrained).read_text(), tmp_path / "m.evc")
    assert recovering(plan.passes)[0] == 2


def test_judge_recovery_without_a_finetune_is_a_spec_error_at_the_key(tmp_path, untrained):
    message = check_fails(write(tmp_path, untrained, ", judge = recovery", finetune=""))
    assert "m.evc:11:66:" in message and "judge = recovery needs a finetune after the passes it searches" in message


@pytest.mark.parametrize("value, message", [("5M", "expected a duration (90s, 10min), found 5M"),
                                            ("0s", "out of range")])
def test_a_time_limit_is_a_duration(tmp_path, untrained, value, message):
    assert message in check_fails(write(tmp_path, untrained, f", time = {value}"))


def test_a_time_limit_reads_seconds_and_minutes(tmp_path, untrained):
    from evc.spec.check import parse_and_check

    for written, seconds in (("90s", 90), ("10min", 600), ("500ms", 0.5)):
        plan = parse_and_check(write(tmp_path, untrained, f", time = {written}").read_text(), tmp_path / "m.evc")
        assert plan.budget.params["time"] == seconds


def test_the_held_back_split_takes_the_same_share_of_every_class_and_follows_the_seed():
    class Labelled:
        labels = [k % 3 for k in range(60)]

        def __len__(self):
            return 60

    run = Run(None, Labelled(), Recipe(seed=0), {})
    split = Split.of(run, 0.2)
    assert sorted(split.train + split.held) == list(range(60))
    assert [sum(Labelled.labels[i] == k for i in split.held) for k in range(3)] == [4, 4, 4]
    assert Split.of(run, 0.2) == split
    other = Split.of(Run(None, Labelled(), Recipe(seed=1), {}), 0.2)
    assert other.held != split.held


def test_judge_data_naming_no_data_block_is_a_spec_error(tmp_path, untrained):
    message = check_fails(write(tmp_path, untrained, ", judge_data = tune"))
    assert "m.evc:11:" in message and "undefined data 'tune'" in message


def judged(name, right, alike=False, loss=0.5):
    """A judged candidate whose images right are those of `right` (1) of the judged ones."""
    import numpy as np

    scores = np.asarray(right, dtype=float)
    return Candidate(name, {}, alike=alike, loss=loss, top1=float(scores.mean()), scores=scores)


def test_an_allocation_a_few_images_ahead_of_uniform_ratios_is_not_chosen_over_them():
    import numpy as np

    rng = np.random.default_rng(0)
    flat = rng.random(300) < 0.9
    uniform = judged("uniform", flat, alike=True)
    ahead = flat.copy()  # 2 images ahead on 300, 20 images in which the two differ: noise
    ahead[np.flatnonzero(~flat)[:11]], ahead[np.flatnonzero(flat)[:9]] = True, False
    noisy = judged("noisy", ahead)
    assert noisy.top1 > uniform.top1
    lead, error = noisy.lead(uniform)
    assert lead == pytest.approx(2 / 300) and lead < error
    assert winner([uniform, noisy], uniform) == (uniform, uniform, bar(1))

    clear = flat.copy()  # 12 images ahead, none behind
    clear[np.flatnonzero(~flat)[:12]] = True
    better = judged("better", clear)
    assert winner([uniform, noisy, better], uniform) == (better, uniform, bar(2))


def test_the_more_rivals_the_higher_the_bar_one_must_clear_to_be_chosen_over_uniform_ratios():
    from statistics import NormalDist

    assert bar(1) == pytest.approx(1.0) and bar(7) == pytest.approx(2.0, abs=0.01)
    chance = 1 - NormalDist().cdf(1.0)  # that one rival no better than uniform clears one standard error
    for rivals in (2, 3, 7, 12):  # that one of `rivals` clears the bar: the same, at most
        assert 1 - (1 - (1 - NormalDist().cdf(bar(rivals)))) ** rivals <= chance
        assert bar(rivals) > bar(rivals - 1)


def test_the_baseline_is_the_best_of_the_uniform_ratios_and_the_first_ranked_that_leads_it_wins():
    import numpy as np

    base = np.zeros(200)
    base[:150] = 1
    uniform = judged("uniform", base, alike=True)
    heads = base.copy()
    heads[150:160] = 1  # 10 ahead of uniform, and alike in every block: the baseline
    flat = judged("head_prune 2/3, rest uniform", heads, alike=True)
    first = heads.copy()
    first[160:167], first[:4] = 1, 0  # 3 ahead of the baseline, 11 images apart: ranked first, by chance
    second = heads.copy()
    second[160:163] = 1  # 3 ahead, none behind: a lead of 1.74 standard errors
    a, b = judged("ahead by chance", first, loss=0.4), judged("ahead", second, loss=0.45)
    assert a.top1 == b.top1 and a.lead(flat)[0] / a.lead(flat)[1] < 1 < bar(2) < b.lead(flat)[0] / b.lead(flat)[1]
    assert winner([uniform, flat, a, b], uniform) == (b, flat, bar(2))
    assert winner([uniform, flat, a], uniform) == (flat, flat, bar(1))
    unjudged = judged("left out", np.ones(200))
    unjudged.loss = None  # past the time limit: not judged, never chosen
    assert winner([uniform, unjudged], uniform) == (uniform, uniform, bar(1))
