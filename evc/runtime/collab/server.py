"""One part of a decomposed bundle, served over gRPC: `evc serve BUNDLE --part K --port P`.

    server = serve(Path("build/devit/collab"), part=1, port=50052)
    print(server.address)          # where it listens; port 0 binds a free port
    server.wait_for_termination()

The model is loaded once and checked against collab.json before the port
opens. Images of the wrong shape are refused with INVALID_ARGUMENT, naming
the shape expected and the shape received.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from evc.errors import InputError, first_line
from evc.runtime.collab import collab_pb2 as pb
from evc.runtime.collab import collab_pb2_grpc, wire
from evc.runtime.collab.contract import IMAGE_DTYPES, Collab, read
from evc.runtime.collab.runtime import part_model


class PartServicer(collab_pb2_grpc.PartServicer):
    def __init__(self, collab: Collab, k: int, threads: int | None = None):
        from evc.keys import file_digest

        entry = collab.parts[k]
        self.k, self.collab = k, collab
        self.features = part_model(collab, k, threads)
        digest = file_digest(collab.folder / entry.model)
        if entry.sha256 and digest != entry.sha256:
            raise InputError(f"{collab.folder / entry.model}: sha256 {digest}, but {collab.file}'s parts[{k}] "
                             f"pins {entry.sha256}")
        self.info = pb.PartInfo(index=k, output_dim=entry.output_dim, input_shape=collab.input_shape,
                                model=entry.model, sha256=digest)
        self.lock = threading.Lock()  # one model, one image batch at a time; the LiteRT interpreter is not shared

    def Features(self, request, context):
        try:
            images = wire.array(request.images, IMAGE_DTYPES)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"part {self.k}: malformed images: {e}")
        problem = self.collab.images_problem(images.shape, str(images.dtype))
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"part {self.k}: {problem}")
        images = self.collab.normalised(images)
        try:
            with self.lock:
                start = time.perf_counter_ns()
                features = self.features(images)
                compute_us = (time.perf_counter_ns() - start) // 1000
        except Exception as e:  # the runtime's own error, passed on to the coordinator as text
            context.abort(grpc.StatusCode.INTERNAL, f"part {self.k}: the model failed: {first_line(e)}")
        return pb.Features(features=wire.tensor(features), compute_us=compute_us)

    def Describe(self, request, context):
        return self.info


def serve(bundle: Path, part: int, port: int, host: str = "127.0.0.1", threads: int | None = None) -> grpc.Server:
    """A started server for part `part` of `bundle` on host:port; its `address` says where it listens."""
    collab = read(bundle)
    if not 0 <= part < len(collab.parts):
        raise InputError(f"--part {part}: {bundle} has parts 0 to {len(collab.parts) - 1}")
    if not 0 <= port < 65536:
        raise InputError(f"--port {port}: expected 0 (any free port) to 65535")
    servicer = PartServicer(collab, part, threads)
    server = grpc.server(ThreadPoolExecutor(max_workers=4), options=wire.SERVER_OPTIONS)
    collab_pb2_grpc.add_PartServicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(wire.address(host, port))
    except RuntimeError:
        bound = 0
    if not bound:
        raise InputError(f"cannot listen on {wire.address(host, port)}: the port is taken or the host is not "
                         "an address of this machine")
    server.start()
    server.address = wire.address(host, bound)
    return server
