"""parse_hrt.py: hrt_model_exec perf results, read on the board with the standard library alone."""

import json
import subprocess
import sys

import pytest

from evc.targets.payload.parse_hrt import parse_perf
from tests.conftest import ROOT

PARSER = ROOT / "evc" / "targets" / "payload" / "parse_hrt.py"

HEADER = """\
I0000 00:00:00.000000  2789 vlog_is_on.cc:197] RAW: Set VLOG level for "*" to 3
[BPU_PLAT]BPU Platform Version(1.3.6)!
[HBRT] set log level as 0. version = 3.15.54.0
[DNN] Runtime version = 1.23.10_(3.15.54 HBRT)
[A][DNN][packed_model.cpp:247][Model](2024-09-23,14:06:20.713.561) [HorizonRT] The model builder version = 1.23.8
Load model to DDR cost 28.468ms.
I0923 14:06:20.742473  2789 function_util.cpp:323] get model handle success
I0923 14:06:20.742605  2789 function_util.cpp:656] get model input count success
I0923 14:06:20.742779  2789 function_util.cpp:687] prepare input tensor success!
I0923 14:06:20.742828  2789 function_util.cpp:697] get model output count success
"""

ONE_THREAD = HEADER + """\
Frame count: 200,  Thread Average: 8.571925 ms,  thread max latency: 9.102000 ms,  thread min latency: 8.487000 ms,  FPS: 116.425202

Running condition:
  Thread number is: 1
  Frame count   is: 200
  Program run time: 1718.312000 ms
Perf result:
  Frame totally latency is: 1714.385010 ms
  Average    latency    is: 8.571925 ms
  Frame      rate       is: 116.394213 FPS
"""

FOUR_THREADS = HEADER + """\
Running condition:
  Thread number is: 4
  Frame count   is: 200
  Program run time: 823.457000 ms
Perf result:
  Frame totally latency is: 3218.145020 ms
  Average    latency    is: 16.090725 ms
  Frame      rate       is: 242.879564 FPS
"""

# The progress line alone, as a run cut short (or an older runtime) leaves it.
PROGRESS_ONLY = HEADER + """\
Frame count: 200,  Thread Average: 9.01 ms,  thread max latency: 12.5 ms,  thread min latency: 8.4 ms,  FPS: 110.9
Frame count: 400,  Thread Average: 8.60 ms,  thread max latency: 9.2 ms,  thread min latency: 8.5 ms,  FPS: 116.2
"""


def test_the_closing_summary_gives_latency_fps_threads_and_frames():
    assert parse_perf(FOUR_THREADS) == {
        "threads": 4, "frames": 200, "run_time_ms": 823.457, "latency_ms": 16.090725, "fps": 242.879564,
        "form": "summary"}


def test_with_both_forms_the_summary_wins_and_the_line_adds_max_and_min_latency():
    result = parse_perf(ONE_THREAD)
    assert (result["latency_ms"], result["fps"], result["threads"]) == (8.571925, 116.394213, 1)
    assert (result["max_latency_ms"], result["min_latency_ms"]) == (9.102, 8.487)
    assert result["form"] == "summary"


def test_the_one_line_form_alone_gives_its_last_report():
    assert parse_perf(PROGRESS_ONLY) == {
        "frames": 400, "latency_ms": 8.6, "max_latency_ms": 9.2, "min_latency_ms": 8.5, "fps": 116.2, "form": "line"}


def test_output_without_a_result_is_an_error_naming_what_was_looked_for():
    with pytest.raises(ValueError, match="no hrt_model_exec perf result found .*Average latency is"):
        parse_perf(HEADER + "hrt_model_exec: failed to load model.bin\n")


def run_parser(*args):
    # -I -S: no site-packages and no user paths, as on a bare board.
    return subprocess.run([sys.executable, "-I", "-S", str(PARSER), *map(str, args)], capture_output=True, text=True)


def test_the_parser_runs_alone_with_the_standard_library_and_prints_a_table(tmp_path):
    (tmp_path / "perf_threads_1.log").write_text(ONE_THREAD)
    (tmp_path / "perf_threads_4.log").write_text(FOUR_THREADS)
    done = run_parser(tmp_path / "perf_threads_1.log", tmp_path / "perf_threads_4.log")
    assert done.returncode == 0, done.stderr
    header, one, four = done.stdout.splitlines()
    assert header.split() == ["log", "threads", "frames", "latency", "ms", "FPS"]
    assert one.split()[1:] == ["1", "200", "8.572", "116.4"]
    assert four.split()[1:] == ["4", "200", "16.091", "242.9"]


def test_json_output_holds_one_result_per_log(tmp_path):
    (tmp_path / "a.log").write_text(FOUR_THREADS)
    done = run_parser("--json", tmp_path / "a.log")
    assert json.loads(done.stdout)["results"] == [{"log": str(tmp_path / "a.log"), **parse_perf(FOUR_THREADS)}]


def test_a_log_without_a_result_exits_1_naming_the_log(tmp_path):
    (tmp_path / "broken.log").write_text(HEADER)
    done = run_parser(tmp_path / "broken.log")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"parse_hrt.py: {tmp_path / 'broken.log'}: no hrt_model_exec perf result found")
