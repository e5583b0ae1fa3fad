"""device = android: a phone running TFLite or ExecuTorch, benchmarked over adb by each one's own tool.

    target phone { device = android, format = tflite, quantize = dynamic, threads = 4, cores = "f0" }
    target phone { device = android, format = pte, quantize = int8, calibrate = calib, threads = 4 }

The bundle carries the model, `bench.sh` (pushes the model and the tool's
binary with adb and runs it under taskset), the parser of the tool's output,
and a README on getting the binary: TFLite's `benchmark_model` for a
`.tflite`, ExecuTorch's `executor_runner` built with XNNPACK for a `.pte`.
`evc bench BUNDLE --serial SERIAL` does the same from here through adbutils
and prints the parsed figures: init, first inference, inference average, std,
and for benchmark_model warm-up average and peak memory.
"""

from __future__ import annotations

import json
from pathlib import Path

from evc.errors import BuildError, InputError
from evc.registry import Device, RemoteBench, RemoteTimed, register_device
from evc.spec.params import Int, ListOf, Param, Text

DEVICE_DIR = "/data/local/tmp/evc"  # adb shell may write here without root
BINARY = "benchmark_model"
RUNNER = "executor_runner"  # ExecuTorch's, built with XNNPACK: what runs a .pte
FORMAT_TOOLS = {"tflite": BINARY, "pte": RUNNER}  # the binary that benchmarks a model, by its format
TOOLS = {f".{fmt}": tool for fmt, tool in FORMAT_TOOLS.items()}  # ... by its file's suffix: each format's own
RUN_TIMEOUT_S = 1800


def benchmark_command(params: dict, model: str, threads: int, runs: int | None = None) -> list[str]:
    """The command the phone runs for one thread count, as bench.sh runs it too. executor_runner has no
    warm-up of its own: it runs warmups + runs times, and its parser leaves the warm-ups out."""
    runs = runs or params["runs"]
    if model.endswith(".pte"):
        command = [f"{DEVICE_DIR}/{RUNNER}", f"--model_path={DEVICE_DIR}/{model}", f"--cpu_threads={threads}",
                   f"--num_executions={params['warmups'] + runs}"]
    else:
        command = [f"{DEVICE_DIR}/{BINARY}", f"--graph={DEVICE_DIR}/{model}", f"--num_threads={threads}",
                   f"--num_runs={runs}", f"--warmup_runs={params['warmups']}"]
    return ["taskset", params["cores"], *command] if params["cores"] else command


def parse(model: str, output: str, params: dict) -> dict:
    """The figures of one run of the tool that benchmarks `model`; ValueError when it did not finish."""
    if model.endswith(".pte"):
        from evc.targets.payload.parse_executor_runner import parse as parse_runner

        return parse_runner(output, params["warmups"])
    from evc.targets.payload.parse_benchmark_model import parse as parse_benchmark_model

    return parse_benchmark_model(output)


def tool_for(model: str) -> str:
    return TOOLS[Path(model).suffix]


def phone(serial: str):
    """The adbutils device for `serial`; InputError (exit 2) with a plain reason when there is none."""
    import adbutils

    client = adbutils.AdbClient()
    where = f"{client.host}:{client.port}"
    try:
        states = {info.serial: info.state for info in client.list()}
    except (adbutils.AdbError, OSError) as e:  # OSError: adbutils found no adb executable to start a server
        raise InputError(f"no adb server at {where}, and adb could not start one ({e}); install Android "
                         "platform-tools (Debian: apt install adb) and run `adb start-server`") from None
    if serial not in states:
        listed = ", ".join(f"{s} ({state})" for s, state in states.items()) or "none"
        raise InputError(f"no device '{serial}' attached to the adb server at {where} "
                         f"(attached: {listed}); connect the phone and enable USB debugging")
    if states[serial] != "device":
        raise InputError(f"device '{serial}' is {states[serial]}: unlock it and accept the USB debugging prompt")
    return client.device(serial)


def bench_on_phone(bundle: Path, manifest: dict, serial: str, runs: int | None, console) -> list[dict]:
    """Push the model and its tool, run it once per thread count, parse, print and save the figures."""
    import adbutils

    device = phone(serial)
    tool = tool_for(manifest["artifacts"][0]["path"])
    binary = bundle / tool
    if not binary.is_file():
        how = "download" if tool == BINARY else "build"
        raise InputError(f"no {tool} binary in {bundle}: {how} it for the phone's ABI as its "
                         "README.md shows, then run this again")
    try:
        rows = _run_on(device, bundle, binary, manifest, runs)
    except adbutils.AdbError as e:  # the phone went away, or refused a push
        raise InputError(f"adb lost '{serial}' while benchmarking: {e}") from None
    console.print(_table(rows, f"{bundle} on {serial}: {manifest['artifacts'][0]['path']}"))
    return rows


def _run_on(device, bundle: Path, binary: Path, manifest: dict, runs: int | None) -> list[dict]:
    params, model = manifest["target"]["params"], manifest["artifacts"][0]["path"]
    device.shell(["mkdir", "-p", DEVICE_DIR])
    device.sync.push(str(bundle / model), f"{DEVICE_DIR}/{model}", mode=0o644)
    device.sync.push(str(binary), f"{DEVICE_DIR}/{binary.name}", mode=0o755)
    results = bundle / "results"
    results.mkdir(exist_ok=True)
    rows = []
    for threads in params["threads"]:
        done = device.shell2(benchmark_command(params, model, threads, runs), timeout=RUN_TIMEOUT_S)
        (results / f"{binary.name}.t{threads}.log").write_text(done.output)
        try:
            rows.append({"threads": threads, **parse(model, done.output, params)})
        except ValueError as e:
            tail = "\n".join(done.output.strip().splitlines()[-5:])
            raise BuildError(f"{binary.name} on '{device.serial}' (exit {done.returncode}): {e}:\n{tail}") from None
    (results / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def profiling_phone(serial: str, binary: Path):
    """The phone a latency table is measured on, checked before any model is made for it."""
    if not binary.is_file():
        raise InputError(f"--binary {binary}: no such file; get benchmark_model (tflite) or executor_runner (pte) "
                         "for the phone's ABI (the android bundle's README.md says where)")
    return phone(serial)


def time_on_phone(device, binary: Path, models: dict[object, Path], params: dict, threads: int) -> dict:
    """Each model's average inference ms on the phone by `binary` (benchmark_model for .tflite, executor_runner
    for .pte), one after another (a latency table's grid, for evc profile)."""
    import adbutils

    serial = device.serial
    times = {}
    try:
        device.shell(["mkdir", "-p", DEVICE_DIR])
        for key, path in models.items():
            model, tool = f"profile{path.suffix}", tool_for(path.name)
            device.sync.push(str(binary), f"{DEVICE_DIR}/{tool}", mode=0o755)
            device.sync.push(str(path), f"{DEVICE_DIR}/{model}", mode=0o644)
            done = device.shell2(benchmark_command(params, model, threads), timeout=RUN_TIMEOUT_S)
            try:
                times[key] = parse(model, done.output, params)["inference_avg_ms"]
            except ValueError as e:
                raise BuildError(f"{tool} on '{serial}' (exit {done.returncode}) for {path.name}: {e}") from None
    except adbutils.AdbError as e:
        raise InputError(f"adb lost '{serial}' while profiling: {e}") from None
    return times


def _table(rows: list[dict], title: str):
    from rich.table import Table

    table = Table(title=title)
    columns = (("threads", "threads"), ("init ms", "init_ms"), ("first ms", "first_inference_ms"),
               ("warm-up avg ms", "warmup_avg_ms"), ("avg ms", "inference_avg_ms"), ("std ms", "inference_std_ms"))
    for name, _ in columns:
        table.add_column(name, justify="right")
    table.add_column("peak MB", justify="right")
    for row in rows:
        peak = row.get("peak_memory_mb", {}).get("overall")
        table.add_row(*(_cell(row.get(key)) for _, key in columns), _cell(peak))
    return table


def _cell(value) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


@register_device(
    "android",
    Param("threads", ListOf(Int(1, 64), or_single=True), (4,),
          "threads the benchmark runs with (benchmark_model's --num_threads, executor_runner's --cpu_threads); "
          "a list runs once per count"),
    Param("cores", Text(pattern=r"(0x)?[0-9a-fA-F]{1,16}", shape='a CPU mask in hex, e.g. "f0"'), None,
          'taskset mask the benchmark is pinned to, e.g. "f0" for cores 4-7 (the big cores of most phones)'),
    Param("runs", Int(1), 50, "timed runs (--num_runs; executor_runner: executions after the warm-ups)"),
    Param("warmups", Int(0), 10, "untimed runs before timing (--warmup_runs; executor_runner: the first "
          "executions, left out of the figures)"),
    Param("serial", Text(pattern=r"[A-Za-z0-9._:-]{1,64}", shape='an adb serial, e.g. "R58M12ABCDE"'), None,
          "the phone bench.sh uses when more than one is attached (default: $ANDROID_SERIAL or the only one)"),
    Param("peers", ListOf(Text(pattern=r"[A-Za-z0-9._-]+:[0-9]{1,5}", shape='"HOST:PORT"')), (),
          "where a decomposed model's parts are served, one per part in part order: collab.json's placement "
          "and evc infer's default --peers"),
    formats=("tflite", "pte"),
    templates="android",
    format_files={"tflite": ("parse_benchmark_model.py",), "pte": ("parse_executor_runner.py",)},
)
class Android(Device, RemoteBench, RemoteTimed):
    """an Android phone running TFLite's benchmark_model or ExecuTorch's executor_runner over adb"""

    def bench(self, bundle: Path, manifest: dict, serial: str, runs: int | None, console) -> list[dict]:
        return bench_on_phone(bundle, manifest, serial, runs, console)

    def binary(self, fmt: str) -> str:
        return FORMAT_TOOLS[fmt]

    def connect(self, serial: str, binary: Path):
        return profiling_phone(serial, binary)

    def time(self, device, binary: Path, models: dict, params: dict, threads: int) -> dict:
        return time_on_phone(device, binary, models, params, threads)
