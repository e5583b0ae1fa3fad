"""decompose's runtime: what serving the parts over gRPC costs on top of running them.

    .venv/bin/python benchmarks/collab.py [--parts 2 4] [--runs 50] [--no-faults]

For N = 2 and 4, a decomposed bundle of N small ViTs (timm's VisionTransformer
at 224×224, patch 16, width 128, depth 6, 2 heads, each answering its class
token of 128 features; random init), lowered as evc's onnx format lowers a
Program (torch.onnx, onnxslim), and a fusion (a Linear over the features,
masked by `present`, to 1000 logits). Each part is served by `evc serve
--threads 1` in its own process on loopback; the coordinator runs the fusion
here. Timed taking turns run by run, one image per call, at 1 thread each:

    part k alone        part k's model in ONNX Runtime, in this process
    parts at once       all N models, in this process, each in its own thread
                        (ONNX Runtime releases the GIL): the same CPU contention
                        as the served parts, without gRPC
    fusion alone        the fusion in ONNX Runtime, in this process
    over gRPC           Coordinator.infer: the image to every part, their
                        features back, the fusion
    one call            part 0 alone over gRPC: its request built, sent, its
                        features back and read (the per-call cost, without the
                        other parts competing for the cores)
    transfer            the request's and the reply's bytes through a loopback
                        TCP socket and back, once per part, the parts at once;
                        and for part 0 alone
    ..., pixels         the same three rows with the image sent as uint8 pixels
                        (what `evc infer` sends for a picture file), which the
                        part normalises: a quarter of the bytes

Each served part also says how long its model took for the call (the reply's
`compute_us`); `over gRPC − served compute` is the call less the slowest
part's, the serving's own cost, free of a part running slower in its own
process than here.

Then, in the same run, the runtime before its streams (one unary call per
part and image, `Unary`) beside the coordinator's streams: each one's cost
over the slowest part at one client, and, with 8 clients at once (each its own
coordinator, for 6 s), the median ms per call less the slowest part's served
compute, and the calls per second; then 4 clients for 24 s while one part in
turn is killed every 6 s and restarted on its port: the calls per second and
the share of answers that were full, degraded (marked so) and failed.

The goal: `over gRPC` at most 1 ms plus the transfer above the slowest part
alone. That holds the parts' competition for the cores as well, which on a
machine with fewer free cores than parts is no cost of serving: the table
also gives `over gRPC` less `parts at once` and `fusion alone`, and `one call`
less part 0 alone against part 0's transfer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import onnxruntime as ort
import timm
import torch
from _timing import interleaved  # benchmarks/, the script's own folder

from evc.errors import PeerError
from evc.ir.program import Program
from evc.runtime.collab import collab_pb2 as pb
from evc.runtime.collab import collab_pb2_grpc, wire
from evc.runtime.collab.contract import read
from evc.runtime.collab.coordinator import Coordinator
from evc.runtime.collab.runtime import Fusion
from evc.spec.plan import ImageInput
from evc.targets.onnx import export_onnx, session

SIZE, WIDTH, DEPTH, HEADS, CLASSES = 224, 128, 6, 2, 1000
THREADS = 1


def part(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=SIZE, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                             num_classes=0).eval()


class MaskedFusion(torch.nn.Module):
    def __init__(self, parts: int):
        super().__init__()
        self.register_buffer("blocks", torch.kron(torch.eye(parts), torch.ones(1, WIDTH)))
        self.head = torch.nn.Linear(parts * WIDTH, CLASSES)

    def forward(self, tokens, present):
        return self.head(tokens * (present @ self.blocks))


def write_bundle(folder: Path, parts: int) -> Path:

    entries = []
    for k in range(parts):
        export_onnx(Program.from_module(part(k), ImageInput(SIZE, SIZE)), folder / f"part{k}.onnx", 17)
        entries.append({"index": k, "model": f"part{k}.onnx", "output_dim": WIDTH})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(MaskedFusion(parts).eval(), (torch.zeros(1, parts * WIDTH), torch.ones(1, parts)),
                          str(folder / "fusion.onnx"), dynamo=False, opset_version=17,
                          input_names=["tokens", "present"], output_names=["logits"])
    (folder / "collab.json").write_text(json.dumps({
        "version": 1, "input": {"name": "input", "shape": [3, SIZE, SIZE], "dtype": "float32"},
        "parts": entries, "fusion": {"model": "fusion.onnx", "degraded_ok": True}, "deadline_ms": 5000}))
    return folder


def serve_all(bundle: Path, parts: int, logs: Path) -> tuple[list[subprocess.Popen], list[str]]:
    processes, peers = [], []
    try:
        for k in range(parts):
            with open(logs / f"serve{k}.err", "w") as err:
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "evc", "serve", str(bundle), "--part", str(k), "--port", "0",
                     "--threads", str(THREADS)], stdout=subprocess.PIPE, stderr=err, text=True))
        for k, process in enumerate(processes):
            line = process.stdout.readline()  # evc serve prints its address once the model is loaded
            if not line.startswith("serving part"):
                raise SystemExit(f"evc serve --part {k} did not start:\n{(logs / f'serve{k}.err').read_text()}")
            peers.append(line.split()[-1])
    except BaseException:
        stop(processes)
        raise
    return processes, peers


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.kill()
        process.wait(10)


class Echo:
    """A loopback TCP peer that reads `request` bytes and answers `reply` bytes: the transfer alone."""

    def __init__(self, request: int, reply: int):
        self.request, self.reply = request, reply
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()
        self.client = socket.create_connection(("127.0.0.1", self.port))
        self.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _serve(self):
        conn, _ = self.listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        answer = bytes(self.reply)
        while _read(conn, self.request):
            conn.sendall(answer)

    def round_trip(self, payload: bytes) -> None:
        self.client.sendall(payload)
        _read(self.client, self.reply)

    def close(self):
        self.client.close()
        self.listener.close()


def _read(conn: socket.socket, count: int) -> bool:
    view = memoryview(bytearray(count))
    got = 0
    while got < count:
        n = conn.recv_into(view[got:])
        if not n:
            return False
        got += n
    return True


def measure(parts: int, runs: int, work: Path) -> dict:
    (work / f"n{parts}").mkdir()
    bundle = write_bundle(work / f"n{parts}", parts)
    feed = np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE), dtype=np.float32)
    return timed(bundle, feed, runs, work)


def timed(bundle: Path, feed: np.ndarray, runs: int, logs: Path, alongside: dict | None = None) -> dict:
    """Median ms of this table's runs on `bundle`, and of the runs `alongside`, all taking turns, each part
    served by `evc serve` on loopback; the bytes of a part's request and replies, the parts' features and
    the served logits for `feed`."""
    collab = read(bundle)
    parts = len(collab.parts)
    models = [session(bundle / p.model, THREADS) for p in collab.parts]
    fusion = Fusion(collab, THREADS)
    features = [m(feed) for m in models]
    pixels = np.random.default_rng(1).integers(0, 256, feed.shape, dtype=np.uint8)
    request, pixel_request = (pb.Images(images=wire.tensor(x)).ByteSize() for x in (feed, pixels))
    replies = [pb.Features(features=wire.tensor(f)).ByteSize() for f in features]
    processes, peers = serve_all(bundle, parts, logs)
    pool = ThreadPoolExecutor(parts)
    echoes = {size: [Echo(size, reply) for reply in replies] for size in (request, pixel_request)}
    channel = grpc.insecure_channel(peers[0], options=wire.CHANNEL_OPTIONS)
    stub = collab_pb2_grpc.PartStub(channel)
    try:
        with Coordinator(bundle, peers, threads=THREADS) as coordinator:
            answer = coordinator.infer(feed)
            assert not answer.degraded, answer.reasons
            np.testing.assert_array_equal(answer.logits, fusion(features))  # the served answer is the local one
            normalised = collab.normalised(pixels)
            np.testing.assert_array_equal(coordinator.infer(pixels).logits, fusion([m(normalised) for m in models]))
            runs_ = {**(alongside or {}), **{f"part {k} alone": m for k, m in enumerate(models)}}
            runs_["parts at once"] = lambda x: list(pool.map(lambda m: m(x), models))
            unary = Unary(peers, fusion)
            runs_["over unary gRPC"] = lambda x: unary(feed)
            runs_["fusion alone"] = lambda x: fusion(features)
            served = {"": [], ", pixels": []}  # per call over gRPC: its ms less the slowest part's served compute
            for suffix, images, size in (("", feed, request), (", pixels", pixels, pixel_request)):
                payload = bytes(size)
                runs_["over gRPC" + suffix] = lambda x, images=images, log=served[suffix]: log.append(
                    _serving_ms(coordinator.infer(images)))
                runs_["one call" + suffix] = lambda x, images=images: wire.array(
                    stub.Features(pb.Images(images=wire.tensor(images))).features)
                runs_["transfer" + suffix] = lambda x, e=echoes[size], b=payload: list(
                    pool.map(lambda echo: echo.round_trip(b), e))
                runs_["transfer, one part" + suffix] = lambda x, e=echoes[size][0], b=payload: e.round_trip(b)
            times = interleaved(runs_, feed, runs)
            unary.close()
            for suffix, log in served.items():
                times["over gRPC − served compute" + suffix] = statistics.median(log[-runs:])
            load = {"streamed": under_load(bundle, peers, feed, lambda: Coordinator(bundle, peers, threads=THREADS)),
                    "unary": under_load(bundle, peers, feed, lambda: Unary(peers, Fusion(collab, THREADS)))}
    finally:
        channel.close()
        stop(processes)
        pool.shutdown()
        for echo in (e for group in echoes.values() for e in group):
            echo.close()
    return {"times": times, "request": request, "pixel request": pixel_request, "replies": replies,
            "features": features, "logits": answer.logits, "load": load}


class Unary:
    """The runtime before its streams, for the table's `before` rows: one unary Features call per part and
    image batch, all parts at once, then the fusion; called like a Coordinator (`infer`, or the object itself)."""

    def __init__(self, peers: list[str], fusion):
        self.channels = [grpc.insecure_channel(p, options=wire.CHANNEL_OPTIONS) for p in peers]
        self.stubs = [collab_pb2_grpc.PartStub(c) for c in self.channels]
        self.fusion = fusion

    def __call__(self, images):
        request = pb.Images(images=wire.tensor(images))
        calls = [stub.Features.future(request, timeout=5) for stub in self.stubs]
        replies = [call.result() for call in calls]
        logits = self.fusion([wire.array(r.features) for r in replies])
        return SimpleNamespace(logits=logits, compute_ms=[r.compute_us / 1e3 for r in replies], degraded=False)

    infer = __call__

    def close(self):
        for channel in self.channels:
            channel.close()


LOAD_CLIENTS, LOAD_S = 8, 6.0


def under_load(bundle: Path, peers: list[str], feed: np.ndarray, open_client) -> dict:
    """LOAD_CLIENTS clients at once, each its own coordinator calling for LOAD_S seconds: per call, its ms less
    the slowest part's served compute (the serving's cost under load), and the calls per second in all."""
    overheads, count, stop_at = [], [0], time.monotonic() + LOAD_S

    def client():
        with closing(open_client()) as coordinator:
            while time.monotonic() < stop_at:
                start = time.perf_counter()
                answer = coordinator.infer(feed)
                overheads.append((time.perf_counter() - start) * 1e3 - max(answer.compute_ms))
                count[0] += 1

    threads = [threading.Thread(target=client) for _ in range(LOAD_CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"overhead_ms": statistics.median(overheads), "per_s": count[0] / LOAD_S}


def faults(parts: int, work: Path, seconds: float = 24.0, every_s: float = 6.0, clients: int = 4) -> dict:
    """Clients calling for `seconds` while one part (in turn) is killed every `every_s` and started again on its
    port: the calls per second, and the share of answers full, degraded and failed."""
    (work / f"faults{parts}").mkdir()
    bundle = write_bundle(work / f"faults{parts}", parts)
    feed = np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE), dtype=np.float32)
    processes, peers = serve_all(bundle, parts, work)
    outcomes = {"full": 0, "degraded": 0, "failed": 0}
    lock, stop_at = threading.Lock(), time.monotonic() + seconds

    def client():
        with Coordinator(bundle, peers, deadline_s=1.0, threads=THREADS) as coordinator:
            while time.monotonic() < stop_at:
                try:
                    kind = "degraded" if coordinator.infer(feed).degraded else "full"
                except PeerError:
                    kind = "failed"
                with lock:
                    outcomes[kind] += 1

    def killer():
        k = 0
        while time.monotonic() + every_s < stop_at:
            time.sleep(every_s)
            port = peers[k].rsplit(":", 1)[1]
            processes[k].kill()
            processes[k].wait(10)
            with open(work / f"restart{k}.err", "w") as err:
                processes[k] = subprocess.Popen(
                    [sys.executable, "-m", "evc", "serve", str(bundle), "--part", str(k), "--port", port,
                     "--threads", str(THREADS)], stdout=subprocess.PIPE, stderr=err, text=True)
            processes[k].stdout.readline()
            k = (k + 1) % parts

    threads = [threading.Thread(target=client) for _ in range(clients)] + [threading.Thread(target=killer)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        stop(processes)
    total = sum(outcomes.values())
    return {"per_s": total / seconds, **{k: v / total for k, v in outcomes.items()}}


def met(ms: float, goal: float) -> str:
    return f"{ms:.2f} (≤ {goal:.2f}: {'met' if ms <= goal else 'missed'})"


def _serving_ms(answer) -> float:
    """The call's time not spent in the slowest part's model, as the parts measured their models."""
    return answer.ms - max(answer.compute_ms)


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    model = fields.get("Model name", platform.processor() or "unknown CPU").strip()
    cores = len(os.sched_getaffinity(0))
    load = open("/proc/loadavg").read().split()[0]
    return (f"machine: {platform.machine()}, {model}, {cores} cores, load average {load} at the start; "
            f"Python {platform.python_version()}, ONNX Runtime {ort.__version__}, grpcio "
            f"{grpc.__version__}, torch {torch.__version__}, timm {timm.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--faults", action=argparse.BooleanOptionalAction, default=True,
                        help="also time clients while a part is killed and restarted (24 s)")
    args = parser.parse_args()
    print(machine())
    print(f"parts: ViT {SIZE}×{SIZE}, patch 16, width {WIDTH}, depth {DEPTH}, {HEADS} heads; {THREADS} thread each; "
          f"median of {args.runs} runs after 10 warm-ups, one image per call\n")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for parts in args.parts:
            start = time.perf_counter()
            result = measure(parts, args.runs, Path(folder))
            print(f"N = {parts}: measured in {time.perf_counter() - start:.0f} s", file=sys.stderr)
            rows.append((parts, result))
    print("| N | slowest part alone | parts at once, in-process | fusion | image sent as | over gRPC "
          "| over gRPC − slowest part (goal ≤ 1 + transfer) | over gRPC − parts at once − fusion "
          "| over gRPC − slowest served compute − fusion (goal ≤ 1 + transfer) "
          "| one call − part 0 alone (transfer, one part) "
          "| bytes per image and part: request / reply |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for parts, result in rows:
        t = result["times"]
        slowest = max(t[f"part {k} alone"] for k in range(parts))
        for sent, suffix, size in (("float32", "", result["request"]), ("uint8 pixels", ", pixels",
                                                                          result["pixel request"])):
            goal = 1 + t["transfer" + suffix]
            print(f"| {parts} | {slowest:.2f} | {t['parts at once']:.2f} | {t['fusion alone']:.2f} | {sent} | "
                  f"{t['over gRPC' + suffix]:.2f} | {met(t['over gRPC' + suffix] - slowest, goal)} | "
                  f"{t['over gRPC' + suffix] - t['parts at once'] - t['fusion alone']:.2f} | "
                  f"{met(t['over gRPC − served compute' + suffix] - t['fusion alone'], goal)} | "
                  f"{t['one call' + suffix] - t['part 0 alone']:.2f} ({t['transfer, one part' + suffix]:.2f}) | "
                  f"{size:,} / {result['replies'][0]:,} |")
    print("\nms, median of the interleaved runs")
    print("\n### Before (one unary call per part and image) and after (one stream per part), in the same run\n")
    print(f"| N | slowest part alone | transfer | unary: over gRPC − slowest part | streamed: over gRPC − slowest part "
          f"(goal ≤ 1 + transfer) | {LOAD_CLIENTS} clients, unary: ms per call − slowest served compute, calls/s "
          f"| {LOAD_CLIENTS} clients, streamed: the same |")
    print("|---|---|---|---|---|---|---|")
    for parts, result in rows:
        t, load = result["times"], result["load"]
        slowest = max(t[f"part {k} alone"] for k in range(parts))
        print(f"| {parts} | {slowest:.2f} | {t['transfer']:.2f} | {t['over unary gRPC'] - slowest:.2f} | "
              f"{met(t['over gRPC'] - slowest, 1 + t['transfer'])} | {load['unary']['overhead_ms']:.2f}, "
              f"{load['unary']['per_s']:.1f} | {load['streamed']['overhead_ms']:.2f}, "
              f"{load['streamed']['per_s']:.1f} |")
    if args.faults:
        with tempfile.TemporaryDirectory() as folder:
            killed = faults(args.parts[0], Path(folder))
        print(f"\n### A part killed every 6 s and restarted, {args.parts[0]} parts, 4 clients, 24 s, deadline 1 s\n")
        print("| calls/s | full | degraded (marked) | failed |")
        print("|---|---|---|---|")
        print(f"| {killed['per_s']:.1f} | {killed['full']:.1%} | {killed['degraded']:.1%} | {killed['failed']:.1%} |")


if __name__ == "__main__":
    main()
