"""report.html: what a build shows on one page, drawn in a real browser (Debian's headless Chromium).

One small build (a two-block ViT at 32x32, a MACs budget, token merging, an evaluate block, a cpu and an
X5 target) serves every test. The page is opened from disk with every host name unresolvable, and the
charts are counted in the DOM Chromium leaves once they have drawn.
"""

import html
import json
import os
import re
import subprocess
from html.parser import HTMLParser

import pytest

from evc.driver import build
from evc.spec.check import parse_and_check
from tests.conftest import run_evc, small_spec, write_images
from tests.targets.test_parse_hrt import FOUR_THREADS, ONE_THREAD
from tests.tools.test_explain import cumsum_spec

SPEC = small_spec(
    targets="target cpu { device = cpu, format = onnx, runs = 3, warmups = 1 }\n"
            "target x5 { device = rdk_x5, format = bpu, quantize = int8, calibrate = val }",
    extra='data val { images = "val" }\n'
          "compress {\n"
          "    budget { macs = 75%, data = val, samples = 4 }\n"
          "    head_prune { score = l1 }\n"
          "    ffn_prune { score = l1, round_to = 8 }\n"
          "    token_merge { r = 2 }\n"
          "}\n"
          "evaluate { data = val }\n")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    (root / "val").mkdir()
    for c in range(10):
        write_images(root / "val" / f"class_{c}", 1, seed=c)
    (root / "small.evc").write_text(SPEC)
    done = run_evc("build", root / "small.evc", "--out", root / "out")
    assert done.returncode == 0, done.stderr
    assert f"report: {root / 'out' / 'small' / 'report.html'}" in done.stdout
    return root / "out" / "small"


def manifest(build, target):
    return json.loads((build / target / "manifest.json").read_text())


class Marks(HTMLParser):
    """Per chart (a div with id chart-*): its data-drawn/data-error, and the items of each Vega mark group,
    keyed by the group's mark type and name (`rect`, `symbol`, `line`, `rect:child_layer_1`)."""

    def __init__(self):
        super().__init__()
        self.charts, self.stack, self.body = {}, [], {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        chart = attrs.get("id", "") if tag == "div" and attrs.get("id", "").startswith("chart-") else None
        if chart:
            self.charts[chart] = {"attrs": attrs, "marks": {}}
        classes = (attrs.get("class") or "").split()
        group = None
        if tag == "g" and "role-mark" in classes:  # axes, legends and titles are role-axis, role-legend, ...
            group = next(c[5:] for c in classes if c.startswith("mark-"))
            name = next((c for c in classes if c.startswith("child_layer")), None)
            group = f"{group}:{name.removesuffix('_marks')}" if name else group
        owner = chart or (self.stack[-1][1] if self.stack else None)
        parent = self.stack[-1][2] if self.stack else None
        if parent and owner in self.charts and tag in ("path", "line", "text"):
            marks = self.charts[owner]["marks"]
            marks[parent] = marks.get(parent, 0) + 1
        if tag not in ("meta", "br", "img", "input", "link", "hr"):  # HTML's void elements have no end tag
            self.stack.append((tag, owner, group))

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()[0] == tag:
                break


def draw(page):
    """Open `page` in headless Chromium with no network; the DOM once its charts drew, and the console."""
    done = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=30000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    marks = Marks()
    marks.feed(done.stdout)
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return marks, console


def placement_bars(build):
    """An independent count of the placement chart's bars: (op type, place) pairs in op_check.json."""
    nodes = json.loads((build / "x5" / "op_check.json").read_text())["nodes"]
    return len({(n["op"], n["on"]) for n in nodes})


@pytest.mark.slow
def test_the_report_of_a_build_draws_every_chart_with_no_network_and_no_console_message(built):
    page, _ = draw(built / "report.html")
    assert page.body.get("data-charts") == "drawn"
    assert not [name for name, c in page.charts.items() if c["attrs"].get("data-drawn") != "true"]
    assert not [c["attrs"]["data-error"] for c in page.charts.values() if "data-error" in c["attrs"]]


@pytest.mark.slow
def test_each_chart_has_one_mark_per_datum(built):
    page, console = draw(built / "report.html")
    assert console == []
    blocks = len(manifest(built, "cpu")["params_macs"]["before"]["blocks"])
    budget = manifest(built, "cpu")["budget"]
    artifacts = sum("accuracy" in a for t in ("cpu", "x5") for a in manifest(built, t)["artifacts"])
    marks = {name: c["marks"] for name, c in page.charts.items()}
    # before and after, by attention, MLP and tokens
    assert marks["chart-block-macs"] == {"rect": blocks * 2 * 3}
    assert marks["chart-block-params"] == {"rect": blocks * 2 * 3}
    # heads, units, tokens: a bar (after) and a tick (as loaded) per block, in three facets
    shapes = marks["chart-block-shapes"]
    assert shapes["rect:child_layer_0"] == shapes["rect:child_layer_1"] == blocks * 3
    assert marks["chart-placement-x5"] == {"rect": placement_bars(built)}
    # original, compressed and each artifact scored; only the first two are timed until a bench runs
    assert marks["chart-accuracy-macs"] == {"symbol": 2 + artifacts}
    assert marks["chart-accuracy-latency"] == {"symbol": 2}
    # a line per searched block of each pass, a point per width measured
    assert marks["chart-budget-sensitivity"] == {
        "line:child_layer_0": len(budget["sensitivity"]),
        "symbol:child_layer_1": sum(len(g["divergence"]) for g in budget["sensitivity"])}
    assert "chart-latency-cpu" not in marks  # nothing measured yet


@pytest.mark.slow
def test_the_manifest_counts_each_block_by_part_and_the_parts_add_up(built):
    summary = manifest(built, "cpu")["params_macs"]
    for when in ("before", "after"):
        for block in summary[when]["blocks"]:
            parts = block["parts"]
            assert sum(parts[p]["macs"] for p in parts) == block["macs"]
            assert sum(parts[p]["params"] for p in parts) == block["params"]
    # the model as loaded has no token ops; token_merge's matching is counted under tokens, after the passes
    assert all(b["parts"]["tokens"]["macs"] == 0 for b in summary["before"]["blocks"])
    assert all(b["parts"]["tokens"]["macs"] > 0 for b in summary["after"]["blocks"])
    assert all(b["parts"]["tokens"]["params"] == 0 for b in summary["after"]["blocks"])


@pytest.mark.slow
def test_evc_report_folds_in_benchmarks_here_and_on_the_board(built, tmp_path):
    bench = run_evc("bench", built / "cpu", "--runs", "3", "--threads", "1", "2")
    assert bench.returncode == 0, bench.stderr
    here = json.loads((built / "cpu" / "results" / "evc_bench.json").read_text())
    assert [r["threads"] for r in here["results"]] == [1, 2]
    # the X5's bench.sh on the board: hrt_model_exec faked with the output of a real run
    (tmp_path / "hrt_model_exec").write_text(f"""#!/usr/bin/env bash
if [ "$5" = 1 ]; then cat <<'EOF'
{ONE_THREAD}EOF
else cat <<'EOF'
{FOUR_THREADS}EOF
fi
""")
    (tmp_path / "hrt_model_exec").chmod(0o755)
    x5 = manifest(built, "x5")
    compiled = built / "x5" / x5["artifacts"][0]["toolchain"]["output"]
    compiled.parent.mkdir(exist_ok=True)
    compiled.write_bytes(b"")
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    board = subprocess.run(["bash", built / "x5" / "bench.sh"], env=env, capture_output=True, text=True)
    assert board.returncode == 0, board.stderr
    assert [r["latency_ms"] for r in json.loads((built / "x5" / "results.json").read_text())["results"]] == [
        8.571925, 16.090725]

    done = run_evc("report", built)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"report: {built / 'report.html'}"
    page, console = draw(built / "report.html")
    assert console == [] and page.body.get("data-charts") == "drawn"
    marks = {name: c["marks"] for name, c in page.charts.items()}
    assert marks["chart-latency-cpu"] == {"rect": len(manifest(built, "cpu")["artifacts"]) * 2}
    assert marks["chart-latency-x5"] == {"rect": 2}  # the compiled model at 1 and 4 threads
    assert marks["chart-accuracy-latency"] == {"symbol": 3}  # the cpu target's model.onnx, timed here
    text = (built / "report.html").read_text()
    assert "<td>8.57 ms</td>" in text and "<td>16.09 ms</td>" in text and "hrt_model_exec perf" in text


@pytest.mark.slow
def test_an_unchanged_rebuild_leaves_the_report_and_a_new_bench_makes_it_stale(built):
    from evc.tools.report import is_current

    before = (built / "report.html").stat().st_mtime_ns
    again = run_evc("build", built.parent.parent / "small.evc", "--out", built.parent)
    assert again.returncode == 0 and "up to date" in again.stdout
    assert (built / "report.html").stat().st_mtime_ns == before and is_current(built)
    results = built / "cpu" / "results" / "evc_bench.json"
    if results.is_file():
        os.utime(results, ns=(before + 10**9, before + 10**9))
        assert not is_current(built)
    assert not list(built.glob(".report.html*"))  # written beside, renamed into place


@pytest.mark.slow
def test_the_page_needs_nothing_from_outside_it(built):
    text = (built / "report.html").read_text()
    assert "<script src" not in text and "<link" not in text and "@import" not in text
    assert "window.vegaEmbed" in text  # the bundle is inlined


def groups_section(page) -> str:
    """The text of the report's "Pruning groups" section, tags dropped."""
    section = page.read_text().split("<h2>Pruning groups</h2>")[1].split("<h2>")[0]
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", section)))


@pytest.mark.slow
def test_the_report_counts_the_pruning_groups_of_the_model_as_loaded(built):
    assert manifest(built, "cpu")["groups"]["heads"] == {"groups": 2, "heads": 6}  # head_prune cut some after
    text = groups_section(built / "report.html")
    assert "2 heads groups (6 heads), 2 units groups (1536 units), 1 stream (192, left alone)" in text
    assert "node 'scaled_dot_product_attention' scales by 1/sqrt(head_dim) 2 64 blocks.0.attn.qkv.weight" in text


def test_the_report_lists_each_frozen_group_by_reason_naming_its_node(write_spec, tmp_path):
    spec = cumsum_spec(write_spec)
    build(parse_and_check(spec.read_text(), spec), tmp_path / "out")
    text = groups_section(tmp_path / "out" / "net" / "report.html")
    assert "model as loaded: 1 stream (16, left alone)." in text
    # both blocks' cumsum nodes, two groups each, in one row named by the first block's
    assert "node 'cumsum' (cumsum) has no rule for its channels 4 64 blocks.0.fc1.weight , blocks.0.fc1.bias" in text
    assert "it reaches the model's output at node 'head' 1 10 head.weight , head.bias" in text


def test_evc_report_on_a_folder_without_bundles_is_bad_input(tmp_path):
    done = run_evc("report", tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "holds no bundle" in done.stderr and str(tmp_path) in done.stderr


def test_evc_report_has_help():
    done = run_evc("report", "--help")
    assert done.returncode == 0 and "usage: evc report" in done.stdout and "BUILD" in done.stdout.upper()
