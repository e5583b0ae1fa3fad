"""Decomposed bundles small enough to build in seconds, parts served in real processes, and peers that
misbehave on purpose: real gRPC servers that answer late or wrongly."""

from __future__ import annotations

import json
import selectors
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

SHAPE = (3, 32, 32)
CLASSES = 10
START_S = 60  # how long a served part may take to load and report its port, on a loaded machine


def write_bundle(folder: Path, dims: tuple[int, ...], tflite: tuple[int, ...] = (), degraded_ok: bool = True,
                 seed: int = 0) -> Path:
    """A decomposed bundle: part k a small conv net (ONNX, or TFLite for k in `tflite`) from images to
    dims[k] features, and a fusion, a Linear over the features times `present`. All exported at batch 1,
    as evc exports its artifacts."""
    import torch

    torch.manual_seed(seed)
    folder.mkdir(parents=True)
    parts = []
    for k, dim in enumerate(dims):
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.GELU(), torch.nn.Flatten(),
                                    torch.nn.Linear(8 * 8 * 8, dim), torch.nn.Tanh()).eval()
        name = f"part{k}.tflite" if k in tflite else f"part{k}.onnx"
        (_tflite if k in tflite else _onnx)(model, (torch.randn(1, *SHAPE),), folder / name, ["input"])
        parts.append({"index": k, "model": name, "output_dim": dim})
    _onnx(_Fusion(dims).eval(), (torch.randn(1, sum(dims)), torch.ones(1, len(dims))), folder / "fusion.onnx",
          ["tokens", "present"])
    write_collab(folder, {"version": 1, "input": {"name": "input", "shape": list(SHAPE), "dtype": "float32"},
                          "parts": parts, "fusion": {"model": "fusion.onnx", "degraded_ok": degraded_ok},
                          "deadline_ms": 2000})
    return folder


def write_collab(folder: Path, collab: dict) -> None:
    (folder / "collab.json").write_text(json.dumps(collab, indent=1))


def collab_of(folder: Path) -> dict:
    return json.loads((folder / "collab.json").read_text())


def variant(bundle: Path, folder: Path, **fusion) -> Path:
    """A copy of `bundle` whose collab.json's fusion entry has `fusion`'s keys changed."""
    shutil.copytree(bundle, folder)
    collab = collab_of(folder)
    collab["fusion"].update(fusion)
    write_collab(folder, collab)
    return folder


def images(count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *SHAPE), dtype=np.float32)


def _Fusion(dims):
    import torch

    class Fusion(torch.nn.Module):
        """logits from the parts' features, each part's block zeroed where `present` says it is missing, plus
        a term of `present` itself: a runtime that left `present` at 1 for a missing part would answer otherwise."""

        def __init__(self):
            super().__init__()
            blocks = torch.zeros(len(dims), sum(dims))
            for k, start in enumerate(np.cumsum((0,) + dims[:-1])):
                blocks[k, start:start + dims[k]] = 1
            self.register_buffer("blocks", blocks)
            self.head = torch.nn.Linear(sum(dims), CLASSES)
            self.absent = torch.nn.Linear(len(dims), CLASSES, bias=False)

        def forward(self, tokens, present):
            return self.head(tokens * (present @ self.blocks)) + self.absent(1 - present)

    return Fusion()


def _onnx(model, example, path: Path, inputs: list[str]) -> None:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(path), dynamo=False, opset_version=17, input_names=inputs,
                          output_names=["features" if inputs == ["input"] else "logits"])


def _tflite(model, example, path: Path, inputs: list[str]) -> None:
    import torch

    from evc.targets.tflite import quiet

    class Named(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input):
            return {"features": self.inner(input)}

    with quiet():
        import litert_torch

        path.write_bytes(litert_torch.convert(Named().eval(), sample_kwargs={"input": example[0]}).model_content())


@pytest.fixture(scope="session")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """"two": an ONNX part and a TFLite part; "three": three ONNX parts; both with degraded_ok true."""
    root = tmp_path_factory.mktemp("bundles")
    return {"two": write_bundle(root / "two", (16, 24), tflite=(1,)),
            "three": write_bundle(root / "three", (8, 16, 12), seed=1)}


class Served:
    """`evc serve` in its own process; `address` is where it listens."""

    def __init__(self, bundle: Path, part: int, stderr: Path, port: int = 0):
        self.stderr = stderr
        with open(stderr, "w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "evc", "serve", str(bundle), "--part", str(part), "--port", str(port),
                 "--threads", "1"], stdout=subprocess.PIPE, stderr=err, text=True)
        self.address = None

    def wait_started(self) -> str:
        line = _first_line(self.process, START_S)
        if not line.startswith("serving part"):
            self.kill()
            raise AssertionError(f"evc serve did not start: {line!r}\n{self.stderr.read_text()}")
        self.address = line.split()[-1]
        return self.address

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.process.stdout.close()


def _first_line(process, timeout: float) -> str:
    """The first line `process` prints, or '' if it exits or stays silent for `timeout` seconds."""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(timeout=0.2):
                return process.stdout.readline()
            if process.poll() is not None:
                return ""
    return ""


@pytest.fixture
def serve(tmp_path):
    """serve(bundle, parts=None, ports=None) -> [address, ...]: each part in its own `evc serve` process,
    started together; `serve.processes[address]` kills one. All are killed at the end of the test."""
    started: list[Served] = []

    def start(bundle: Path, parts=None, ports=None) -> list[str]:
        parts = range(len(collab_of(bundle)["parts"])) if parts is None else parts
        ports = ports or [0] * len(parts)
        new = [Served(bundle, k, tmp_path / f"serve{len(started) + i}.err", port)
               for i, (k, port) in enumerate(zip(parts, ports))]
        started.extend(new)
        addresses = [s.wait_started() for s in new]
        start.processes.update({s.address: s for s in new})
        return addresses

    start.processes = {}
    try:
        yield start
    finally:
        for served in started:
            served.kill()


@contextmanager
def fake_part(bundle: Path, k: int, reply=None, delay_s: float = 0.0, index: int | None = None, port: int = 0):
    """A real gRPC server on `port` (0: a free one) that says it serves part k of `bundle` (or part `index`)
    and answers Features (and each request of a Stream) with reply(images) -> collab_pb2.Features, after `delay_s`;
    yields its address."""
    import grpc

    from evc.keys import file_digest
    from evc.runtime.collab import collab_pb2 as pb
    from evc.runtime.collab import collab_pb2_grpc, wire

    entry = collab_of(bundle)["parts"][k]
    info = pb.PartInfo(index=k if index is None else index, output_dim=entry["output_dim"], input_shape=SHAPE,
                       model=entry["model"], sha256=file_digest(bundle / entry["model"]))
    released = threading.Event()

    class Fake(collab_pb2_grpc.PartServicer):
        def Features(self, request, context):
            released.wait(delay_s)
            images = wire.array(request.images)
            return reply(images) if reply else pb.Features(features=wire.tensor(np.zeros((len(images), entry[
                "output_dim"]), np.float32)))

        def Stream(self, requests, context):
            for request in requests:
                answer = self.Features(request, context)
                yield pb.Reply(id=request.id, features=answer.features, compute_us=answer.compute_us)

        def Describe(self, request, context):
            return info

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    collab_pb2_grpc.add_PartServicer_to_server(Fake(), server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        released.set()
        server.stop(0).wait(5)


def free_port() -> int:
    """A port nobody listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
