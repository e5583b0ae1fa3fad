"""`evc diff OLD NEW` on two real builds of a small model, and `--json` on build and bench.

Two specs differ only in ffn_prune's keep: the baseline keeps 70% of the MLP units, the change 50%. Both
build two targets and evaluate on labelled images. Edited copies of their manifests stand in for the
regressions a pipeline must catch.
"""

import json
import shutil

import pytest

from evc.errors import InputError
from evc.tools.diff import threshold
from tests.conftest import run_evc, small_spec, write_images

TARGETS = ("target cpu { device = cpu, format = onnx, runs = 3, warmups = 1 }\n"
           "target cpu2 { device = cpu, format = onnx, runs = 3, warmups = 1 }")


def _spec(keep: str) -> str:
    return small_spec(targets=TARGETS, extra='data val { images = "val" }\n'
                                             f"compress {{\n    ffn_prune {{ keep = {keep} }}\n}}\n"
                                             "evaluate { data = val, top = [1] }\n")


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """(baseline build folder, changed build folder, the baseline's `evc build --json` document)."""
    root = tmp_path_factory.mktemp("diff")
    (root / "val").mkdir()
    for c in range(3):
        write_images(root / "val" / f"class_{c}", 2, seed=c)
    documents = {}
    for name, keep in (("base", "70%"), ("change", "50%")):
        spec = root / f"{name}.evc"
        spec.write_text(_spec(keep))
        done = run_evc("build", spec, "--out", root / "out", "--json")
        assert done.returncode == 0, done.stderr
        documents[name] = json.loads(done.stdout)  # stdout is one JSON document, nothing else
    return root / "out" / "base", root / "out" / "change", documents["base"]


def diff(*args):
    return run_evc("diff", *args)


def edited(bundle, tmp_path, edit, name="edited"):
    """A copy of `bundle` whose manifest `edit(manifest)` changed."""
    copy = tmp_path / name / bundle.name
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.slow
def test_build_json_is_one_document_with_each_bundle_and_its_manifest(builds):
    base, _, document = builds
    assert document["schema"] == "evc.build/1" and document["spec"].endswith("base.evc")
    assert [b["target"] for b in document["bundles"]] == ["cpu", "cpu2"]
    for bundle in document["bundles"]:
        assert bundle["cached"] is False and bundle["path"] == str(base / bundle["target"])
        assert bundle["manifest"] == json.loads((base / bundle["target"] / "manifest.json").read_text())


@pytest.mark.slow
def test_a_second_build_json_says_up_to_date(builds):
    base, _, _ = builds
    done = run_evc("build", base.parent.parent / "base.evc", "--out", base.parent, "--json")
    assert done.returncode == 0, done.stderr
    assert [b["cached"] for b in json.loads(done.stdout)["bundles"]] == [True, True]


@pytest.mark.slow
def test_diff_of_two_build_folders_matches_targets_and_shows_the_macs_cut(builds):
    base, change, _ = builds
    done = diff(base, change, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["schema"] == "evc.diff/1" and report["failed"] is False
    assert [t["target"] for t in report["targets"]] == ["cpu", "cpu2"]
    for target in report["targets"]:
        old = json.loads((base / target["target"] / "manifest.json").read_text())
        new = json.loads((change / target["target"] / "manifest.json").read_text())
        macs = target["metrics"]["macs"]
        assert macs["old"] == old["params_macs"]["after"]["total"]["macs"]
        assert macs["new"] == new["params_macs"]["after"]["total"]["macs"] < macs["old"]
        assert target["metrics"]["size"]["new"] == sum(a["size"] for a in new["artifacts"])
        assert target["metrics"]["top1"]["old"] == pytest.approx(100 * old["evaluation"]["compressed"]["top1"])
        assert target["metrics"]["latency"]["old"] == old["evaluation"]["compressed"]["latency_ms"]
        assert target["status"] == "changed"


@pytest.mark.slow
def test_diff_of_a_build_with_itself_has_no_change_and_passes_every_threshold(builds):
    base, _, _ = builds
    done = diff(base, base, "--fail-on", "macs+0%", "--fail-on", "top1-0", "--fail-on", "latency+0")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("no change") == 2 and "CROSSED" not in done.stdout


@pytest.mark.slow
def test_more_macs_than_the_baseline_crosses_macs_plus_0(builds):
    base, change, _ = builds
    assert diff(base, change, "--fail-on", "macs+0%").returncode == 0  # fewer MACs: fine
    done = diff(change, base, "--fail-on", "macs+0%")  # the other way round: more
    assert done.returncode == 1, done.stderr
    assert "CROSSED: macs+0% on target cpu" in done.stdout and "CROSSED: macs+0% on target cpu2" in done.stdout


@pytest.mark.slow
def test_an_accuracy_drop_beyond_the_threshold_exits_1(builds, tmp_path):
    base, _, _ = builds
    old = json.loads((base / "cpu" / "manifest.json").read_text())["evaluation"]["compressed"]["top1"]

    def drop(manifest):
        manifest["evaluation"]["compressed"]["top1"] = old - 0.02  # two points

    worse = edited(base / "cpu", tmp_path, drop)
    crossed = diff(base / "cpu", worse, "--fail-on", "top1-0.5", "--json")
    assert crossed.returncode == 1
    verdict = json.loads(crossed.stdout)["thresholds"][0]
    assert verdict["crossed"] and verdict["limit"] == pytest.approx(100 * old - 0.5)
    assert diff(base / "cpu", worse, "--fail-on", "top1-2.5").returncode == 0


@pytest.mark.slow
def test_size_and_latency_thresholds_read_the_manifest_and_bench_json(builds, tmp_path):
    base, _, _ = builds
    bench = run_evc("bench", base / "cpu", "--json", "--runs", "3", "--threads", "1")
    assert bench.returncode == 0, bench.stderr
    document = json.loads(bench.stdout)
    assert document["schema"] == "evc.bench/1" and document["target"] == "cpu"
    assert [(r["artifact"], r["threads"]) for r in document["rows"]] == [("model.onnx", 1)]
    assert document["rows"][0]["median_ms"] > 0
    old = tmp_path / "old" / "cpu"
    shutil.copytree(base / "cpu", old)
    (old / "bench.json").write_text(bench.stdout)

    def bigger_and_slower(manifest):
        manifest["artifacts"][0]["size"] = int(manifest["artifacts"][0]["size"] * 1.2)

    new = edited(old, tmp_path, bigger_and_slower)
    slower = dict(document, rows=[dict(document["rows"][0], median_ms=document["rows"][0]["median_ms"] * 1.1)])
    (new / "bench.json").write_text(json.dumps(slower))
    done = diff(old, new, "--fail-on", "size+10%", "--fail-on", "latency+5%", "--fail-on", "latency+20%")
    assert done.returncode == 1
    assert "CROSSED: size+10%" in done.stdout and "CROSSED: latency+5%" in done.stdout
    assert "ok: latency+20%" in done.stdout
    assert diff(old, new, "--fail-on", "size+25%").returncode == 0


@pytest.mark.slow
def test_a_target_only_in_one_build_is_reported_added_or_removed(builds, tmp_path):
    base, _, _ = builds
    one = tmp_path / "one"
    shutil.copytree(base / "cpu", one / "cpu")
    report = json.loads(diff(one, base, "--json").stdout)
    assert [(t["target"], t["status"]) for t in report["targets"]] == [("cpu", "same"), ("cpu2", "added")]


@pytest.mark.slow
def test_a_bad_threshold_expression_exits_2_naming_it(builds):
    base, _, _ = builds
    for expression, says in (("latency+five", "expected METRIC+N"), ("speed+5%", "unknown metric 'speed'")):
        done = diff(base, base, "--fail-on", expression)
        assert done.returncode == 2 and expression in done.stderr and says in done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_threshold_on_a_figure_the_build_lacks_exits_2_naming_the_key(builds, tmp_path):
    base, _, _ = builds
    plain = edited(base / "cpu", tmp_path, lambda m: m.pop("evaluation"))
    done = diff(plain, plain, "--fail-on", "top1-1")
    assert done.returncode == 2 and "evaluation.compressed.top1" in done.stderr and str(plain) in done.stderr


@pytest.mark.slow
def test_an_unreadable_manifest_exits_2_naming_the_file_or_key(builds, tmp_path):
    base, _, _ = builds
    broken = tmp_path / "broken" / "cpu"
    shutil.copytree(base / "cpu", broken)
    (broken / "manifest.json").write_text("{ not json")
    done = diff(base / "cpu", broken)
    assert done.returncode == 2 and f"{broken / 'manifest.json'}: not JSON" in done.stderr
    gutted = edited(base / "cpu", tmp_path, lambda m: m.pop("params_macs"), name="gutted")
    done = diff(base / "cpu", gutted)
    assert done.returncode == 2 and "no key 'params_macs'" in done.stderr
    done = diff(base / "cpu", tmp_path / "nowhere")
    assert done.returncode == 2 and "nowhere: no such manifest or build folder" in done.stderr


@pytest.mark.parametrize("text, old, new, crossed", [
    ("latency+5%", 10.0, 10.4, False), ("latency+5%", 10.0, 10.6, True),
    ("macs+0%", 100, 100, False), ("macs+0%", 100, 101, True),
    ("top1-0.5", 80.0, 79.6, False), ("top1-0.5", 80.0, 79.4, True),
    ("cosine-1%", 1.0, 0.995, False), ("cosine-1%", 1.0, 0.98, True),
])
def test_a_threshold_crosses_only_beyond_its_limit(text, old, new, crossed):
    assert threshold(text).crossed(old, new) is crossed


def test_threshold_expressions_that_do_not_parse_are_input_errors():
    for text in ("latency", "latency*5", "+5%", "latency+5%%", "Latency+5"):
        with pytest.raises(InputError):
            threshold(text)


def test_the_ci_example_runs_evc_commands_that_parse_on_a_spec_that_exists():
    """examples/ci/evc.yml: every evc command line in it is one evc's parser takes, every --fail-on parses."""
    import shlex

    import yaml

    from evc.cli import parser
    from tests.conftest import ROOT

    workflow = yaml.safe_load((ROOT / "examples" / "ci" / "evc.yml").read_text())
    spec = workflow["env"]["SPEC"]
    assert (ROOT / spec).is_file()
    commands = [shlex.split(line.strip().replace("$SPEC", spec).split(" > ")[0].removesuffix(" || true"))
                for step in workflow["jobs"]["diff"]["steps"] if "run" in step
                for line in step["run"].replace("\\\n", " ").splitlines() if line.strip().startswith("evc ")]
    assert [c[1] for c in commands] == ["check", "build", "build", "bench", "diff", "diff"]
    for command in commands:
        args = parser().parse_args(command[1:])
        for expression in getattr(args, "fail_on", None) or ():
            threshold(expression)
    gate = parser().parse_args(commands[-1][1:])
    assert gate.old == "build/base" and gate.new == "build/head" and "macs+0%" in gate.fail_on


def test_latency_comes_from_what_evc_bench_saved_in_the_bundle_when_no_bench_json_is_beside_it(tmp_path):
    """`evc bench BUNDLE` saves results/evc_bench.json in the bundle; diff reads it."""
    from evc.tools.diff import figures

    bundle = tmp_path / "cpu"
    (bundle / "results").mkdir(parents=True)
    manifest = {"target": {"name": "cpu"}, "params_macs": {"after": {"total": {"macs": 10, "params": 2}}},
                "artifacts": [{"path": "model.onnx", "size": 5, "parity": None}]}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert "latency" not in figures(bundle / "manifest.json")
    (bundle / "results" / "evc_bench.json").write_text(json.dumps(
        {"machine": {}, "results": [{"artifact": "model.onnx", "threads": 1, "median_ms": 3.5, "p90_ms": 4.0,
                                     "throughput_per_s": 285.7}]}))
    assert figures(bundle / "manifest.json")["latency"] == 3.5
