"""One part of a decomposed bundle, served over gRPC: `evc serve BUNDLE --part K --port P`.

    server = serve(Path("build/devit/collab"), part=1, port=50052)
    print(server.address)          # where it listens; port 0 binds a free port
    server.wait_for_termination()

The model is loaded once and checked against collab.json before the port
opens. A coordinator opens one long-lived stream (`Stream`) and sends each
batch on it with an id; the part answers in order, each reply with its id.
A stream opened by a coordinator holding another build of the bundle is
refused (FAILED_PRECONDITION). Images of the wrong shape are refused naming
the shape expected and the shape received: with INVALID_ARGUMENT on a call of
their own (`Features`), or in that request's reply on a stream, which goes on.
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
from evc.runtime.collab.contract import IMAGE_DTYPES, Collab, bundle_identity, read
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
                                model=entry.model, sha256=digest, bundle=bundle_identity(collab.folder))
        self.lock = threading.Lock()  # one model, one image batch at a time; the LiteRT interpreter is not shared

    def Features(self, request, context):
        try:
            features, compute_us = self.compute(request.images)
        except _Refused as e:
            context.abort(e.code, str(e))
        return pb.Features(features=wire.tensor(features), compute_us=compute_us)

    def Stream(self, requests, context):
        theirs = dict(context.invocation_metadata()).get(wire.BUNDLE_KEY)
        if theirs is not None and theirs != self.info.bundle:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"part {self.k} serves another build of the bundle (identity {self.info.bundle[:12]}, the "
                          f"coordinator's {theirs[:12]})")
        for request in requests:
            try:
                features, compute_us = self.compute(request.images)
            except _Refused as e:
                yield pb.Reply(id=request.id, error=str(e))
                continue
            yield pb.Reply(id=request.id, features=wire.tensor(features), compute_us=compute_us)

    def Describe(self, request, context):
        return self.info

    def compute(self, message: pb.Tensor):
        """(features, the model's µs) for a message of images; _Refused says why not."""
        try:
            images = wire.array(message, IMAGE_DTYPES)
        except ValueError as e:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"part {self.k}: malformed images: {e}") from None
        problem = self.collab.images_problem(images.shape, str(images.dtype))
        if problem:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"part {self.k}: {problem}")
        images = self.collab.normalised(images)
        try:
            with self.lock:
                start = time.perf_counter_ns()
                features = self.features(images)
                return features, (time.perf_counter_ns() - start) // 1000
        except Exception as e:  # the runtime's own error, passed on to the coordinator as text
            raise _Refused(grpc.StatusCode.INTERNAL, f"part {self.k}: the model failed: {first_line(e)}") from None


class _Refused(Exception):
    def __init__(self, code, message: str):
        super().__init__(message)
        self.code = code


def serve(bundle: Path, part: int, port: int, host: str = "127.0.0.1", threads: int | None = None) -> grpc.Server:
    """A started server for part `part` of `bundle` on host:port; its `address` says where it listens."""
    collab = read(bundle)
    if not 0 <= part < len(collab.parts):
        raise InputError(f"--part {part}: {bundle} has parts 0 to {len(collab.parts) - 1}")
    if not 0 <= port < 65536:
        raise InputError(f"--port {port}: expected 0 (any free port) to 65535")
    servicer = PartServicer(collab, part, threads)
    # A stream holds a worker for as long as its coordinator runs: room for many coordinators at once.
    server = grpc.server(ThreadPoolExecutor(max_workers=wire.MAX_STREAMS), options=wire.SERVER_OPTIONS)
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
