"""parse_benchmark_model.py: TFLite's benchmark_model output into JSON, with the standard library only."""

import json
import subprocess
import sys

import pytest

from evc.targets.payload.parse_benchmark_model import main, parse

# The output of a real benchmark_model run on a phone.
OUTPUT = """\
The input model file size (MB): 13.9926
Initialized session in 0.847ms.
Running benchmark for at least 30 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.
count=30 first=57338 curr=46893 min=45730 max=57338 avg=47674.1 std=2073

Running benchmark for at least 30 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
count=30 first=47632 curr=49309 min=44914 max=49309 avg=47440.3 std=1087

Inference timings in us: Init: 847, First inference: 57338, Warmup (avg): 47674.1, Inference (avg): 47440.3
Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to the actual memory footprint of the model at runtime. Take the information at your discretion.
Peak memory footprint (MB): init=1.26562 overall=26.6641
"""

# Newer builds word the memory lines differently and add a monitored peak.
NEWER_MEMORY = """\
Inference timings in us: Init: 9120, First inference: 31002, Warmup (avg): 29876.5, Inference (avg): 29001.2
Memory footprint delta from the start of the tool (MB): init=3.5 overall=40.25
Overall peak memory footprint (MB) via periodic monitoring: 45.125
"""


def test_the_real_tools_output_gives_every_figure_in_milliseconds():
    assert parse(OUTPUT) == {
        "init_ms": 0.847, "first_inference_ms": 57.338, "warmup_avg_ms": 47.6741, "warmup_std_ms": 2.073,
        "inference_avg_ms": 47.4403, "inference_std_ms": 1.087, "inference_min_ms": 44.914,
        "inference_max_ms": 49.309, "runs": 30, "model_size_mb": 13.9926,
        "peak_memory_mb": {"init": 1.26562, "overall": 26.6641},
    }


def test_newer_memory_lines_are_read_too():
    result = parse(NEWER_MEMORY)
    assert result["inference_avg_ms"] == 29.0012
    assert result["peak_memory_mb"] == {"init": 3.5, "overall": 40.25, "monitored": 45.125}
    assert "inference_std_ms" not in result


def test_a_run_that_did_not_finish_is_an_error():
    with pytest.raises(ValueError, match="did not finish"):
        parse("STARTING!\nFailed to allocate tensors!\nBenchmarking failed.\n")


def test_the_command_line_tags_the_thread_count_and_exits_2_on_a_bad_log(tmp_path, capsys):
    (tmp_path / "run.log").write_text(OUTPUT)
    assert main(["--threads", "4", str(tmp_path / "run.log")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["threads"] == 4 and result["inference_avg_ms"] == 47.4403
    (tmp_path / "bad.log").write_text("Benchmarking failed.\n")
    assert main([str(tmp_path / "bad.log")]) == 2
    assert "did not finish" in capsys.readouterr().err


def test_the_parser_runs_alone_in_an_isolated_interpreter_from_stdin():
    from evc.targets.payload import parse_benchmark_model

    done = subprocess.run([sys.executable, "-I", parse_benchmark_model.__file__, "-"], input=OUTPUT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["peak_memory_mb"]["overall"] == 26.6641
