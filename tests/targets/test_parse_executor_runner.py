"""parse_executor_runner.py: ExecuTorch's executor_runner output into JSON, with the standard library only."""

import json
import subprocess
import sys

import pytest

from evc.targets.payload.parse_executor_runner import main, parse

# executor_runner's log as its source writes it (examples/portable/executor_runner/executor_runner.cpp, each
# line by ET_LOG through runtime/platform/default/posix.cpp): 2 warm-ups and 3 timed runs at 4 threads,
# then the output summary the runner prints to stdout.
OUTPUT = """\
I 00:00:00.000412 executorch:executor_runner.cpp:297] Resetting threadpool with num threads = 4
I 00:00:00.003146 executorch:executor_runner.cpp:378] Model file /data/local/tmp/evc/model.pte is loaded.
I 00:00:00.003166 executorch:executor_runner.cpp:388] Using method forward
I 00:00:00.003190 executorch:executor_runner.cpp:446] Setting up CPU planned buffer 0, size 1204224.
I 00:00:00.050321 executorch:executor_runner.cpp:522] Model loaded in 47.201000 ms.
I 00:00:00.063911 executorch:executor_runner.cpp:652] Iteration 1 of 5: 12.652000 ms
I 00:00:00.075902 executorch:executor_runner.cpp:652] Iteration 2 of 5: 11.990000 ms
I 00:00:00.087351 executorch:executor_runner.cpp:652] Iteration 3 of 5: 11.400000 ms
I 00:00:00.098951 executorch:executor_runner.cpp:652] Iteration 4 of 5: 11.600000 ms
I 00:00:00.110751 executorch:executor_runner.cpp:652] Iteration 5 of 5: 11.800000 ms
I 00:00:00.110790 executorch:executor_runner.cpp:666] Model executed successfully 5 time(s) in 59.442000 ms.
I 00:00:00.110801 executorch:executor_runner.cpp:670] 1 outputs:\x20
OutputX 0: tensor(sizes=[1, 10], [-0.41, 0.12, 0.88, -1.2, 0.05, 0.3, -0.07, 0.61, -0.9, 0.22])
"""

# Releases before the per-iteration and load lines log only the total.
TOTAL_ONLY = """\
I 00:00:00.002855 executorch:executor_runner.cpp:127] Model file model.pte is loaded.
I 00:00:00.002871 executorch:executor_runner.cpp:136] Using method forward
I 00:00:00.002886 executorch:executor_runner.cpp:183] Setting up planned buffer 0, size 602112.
I 00:00:00.002891 executorch:executor_runner.cpp:183] Setting up planned buffer 1, size 602112.
I 00:00:00.713226 executorch:executor_runner.cpp:245] Model executed successfully 60 time(s) in 690.000000 ms.
"""


def test_the_warmups_are_left_out_of_the_figures_in_milliseconds():
    assert parse(OUTPUT, warmups=2) == {
        "init_ms": 47.201, "first_inference_ms": 12.652, "inference_avg_ms": 11.6, "inference_std_ms": 0.163299,
        "inference_min_ms": 11.4, "inference_max_ms": 11.8, "runs": 3, "executions": 5, "threadpool_threads": 4,
        "planned_memory_mb": 1.148438,
    }


def test_without_warmups_every_iteration_counts():
    result = parse(OUTPUT)
    assert result["runs"] == 5 and result["inference_max_ms"] == 12.652
    assert result["inference_avg_ms"] == pytest.approx(59.442 / 5)


def test_a_runner_that_logs_only_the_total_gives_its_average_and_says_warmups_are_in_it():
    result = parse(TOTAL_ONLY, warmups=10)
    assert result == {"inference_avg_ms": 11.5, "runs": 60, "warmups_included": True, "executions": 60,
                      "planned_memory_mb": 1.148438}


@pytest.mark.parametrize("text", [OUTPUT.split("I 00:00:00.110790")[0], "", "E 00:00:00.001 executorch:x.cpp:1] "
                                  "Loading of method forward failed with status 0x20"])
def test_a_run_that_did_not_finish_is_a_value_error_naming_the_missing_line(text):
    with pytest.raises(ValueError, match="executor_runner did not finish .*EXECUTORCH_ENABLE_LOGGING"):
        parse(text)


def test_the_script_prints_one_json_object_tagged_with_threads(tmp_path, capsys):
    log = tmp_path / "executor_runner.t4.log"
    log.write_text(OUTPUT)
    assert main(["--warmups", "2", "--threads", "4", str(log)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["threads"] == 4 and result["runs"] == 3


def test_the_script_runs_on_the_standard_library_alone_and_exits_2_on_an_unfinished_run(tmp_path):
    script = "evc/targets/payload/parse_executor_runner.py"
    done = subprocess.run([sys.executable, "-I", "-S", script, "-"], input=OUTPUT, capture_output=True, text=True)
    assert done.returncode == 0 and json.loads(done.stdout)["executions"] == 5
    failed = subprocess.run([sys.executable, "-I", "-S", script, "-"], input="", capture_output=True, text=True)
    assert failed.returncode == 2 and "parse_executor_runner: no 'Model executed successfully' line" in failed.stderr
