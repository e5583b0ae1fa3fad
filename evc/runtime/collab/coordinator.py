"""The coordinator: images to every served part at once, their features fused here into logits.

    with Coordinator(Path("build/devit/collab"), ["10.0.0.2:50051", "10.0.0.3:50051"]) as coordinator:
        answer = coordinator.infer(images)   # answer.logits, answer.degraded, answer.missing

Peers are listed in part order. At start each is asked what it serves
(Describe) and must serve the part, output width, input shape and build of
the bundle this coordinator has. Each part then gets one long-lived stream:
every call sends its images down each part's stream at once, with an id the
reply carries back, and waits for the replies within the call's deadline,
never longer; a reply that comes later is dropped. A stream that breaks (the
part killed, the network gone) fails the calls waiting on it at once, and
the next call opens a new one. Coordinators may be called from many threads. A part that is down, slower than the
deadline or answers with a malformed reply is missing: when the fusion was
trained to do without parts (`degraded_ok`) and one part at least answered,
the answer is fused without it and marked degraded; otherwise PeerError names
the peer, its part and what went wrong.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from evc.errors import InputError, PeerError
from evc.runtime.collab import collab_pb2 as pb
from evc.runtime.collab import collab_pb2_grpc, wire
from evc.runtime.collab.contract import bundle_identity, read
from evc.runtime.collab.runtime import Fusion, checked_images

# How long past the deadline a call may take to report it: gRPC ends the call at the deadline itself, and
# this bounds the wait should it not.
GRACE_S = 0.2


@dataclass(frozen=True)
class Answer:
    logits: np.ndarray
    degraded: bool  # a part did not answer, and the logits were fused without it
    missing: tuple[str, ...] = ()  # the peers that did not answer, by address
    reasons: tuple[str, ...] = ()  # why, one per missing peer: "part 1 at 10.0.0.3:50051: no answer within 500 ms"
    compute_ms: tuple[float | None, ...] = ()  # per part, its model's time as the peer measured it; None if missing
    ms: float = 0.0  # the whole call here, from the images sent to the logits fused


class _Missing(Exception):
    """A peer that did not answer usably; the message says why."""


class Coordinator:
    def __init__(self, bundle: Path, peers: list[str], deadline_s: float | None = None,
                 threads: int | None = None):
        self.collab = read(bundle)
        parts = len(self.collab.parts)
        for peer in peers:
            check_peer(peer)
        if len(peers) != parts:
            raise InputError(f"--peers: {bundle} has {parts} parts, so it takes {parts} peers, in part order; "
                             f"got {len(peers)}")
        if deadline_s is not None and not deadline_s > 0:
            raise InputError(f"the deadline must be positive, not {deadline_s * 1e3:g} ms")
        self.peers = list(peers)
        self.deadline_s = self.collab.deadline_ms / 1e3 if deadline_s is None else deadline_s
        self.fusion = Fusion(self.collab, threads)
        self.channels = [grpc.insecure_channel(peer, options=wire.CHANNEL_OPTIONS) for peer in peers]
        self.stubs = [collab_pb2_grpc.PartStub(channel) for channel in self.channels]
        self.bundle = bundle_identity(self.collab.folder)
        self.links = [_Link(stub, self.bundle) for stub in self.stubs]
        self.ids = itertools.count()
        self.checked = [False] * parts  # whose Describe matched; one down at start is asked again at each call
        try:
            self._check_at_start()
        except BaseException:
            self.close()
            raise

    def infer(self, images: np.ndarray) -> Answer:
        """Logits for images (B, C, H, W) float32, from every part that answers within the deadline."""
        images = checked_images(self.collab, images)
        start = time.monotonic()
        message, request_id = wire.tensor(images), next(self.ids)
        describes = {k: self.stubs[k].Describe.future(pb.Empty(), timeout=self.deadline_s)
                     for k, checked in enumerate(self.checked) if not checked}
        calls = [link.send(request_id, message) for link in self.links]
        features, compute_ms, reasons = [], [], {}
        for k, call in enumerate(calls):
            try:
                if k in describes:
                    self._check(k, self._reply(k, describes[k], start))
                reply = self._streamed(k, call, request_id, start)
                features.append(self._features(k, reply, len(images)))
                compute_ms.append(reply.compute_us / 1e3)
            except _Missing as e:
                self.links[k].forget(request_id)
                features.append(None)
                compute_ms.append(None)
                reasons[k] = str(e)
        if reasons and not (self.collab.degraded_ok and len(reasons) < len(calls)):
            raise PeerError(self._no_answer(reasons))
        logits = self.fusion(features)
        return Answer(logits, degraded=bool(reasons), missing=tuple(self.peers[k] for k in reasons),
                      reasons=tuple(reasons.values()), compute_ms=tuple(compute_ms),
                      ms=(time.monotonic() - start) * 1e3)

    def close(self) -> None:
        for link in self.links:
            link.close()
        for channel in self.channels:
            channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_at_start(self) -> None:
        start = time.monotonic()
        calls = [stub.Describe.future(pb.Empty(), timeout=self.deadline_s) for stub in self.stubs]
        reasons = {}
        for k, call in enumerate(calls):
            try:
                self._check(k, self._reply(k, call, start))
            except _Missing as e:
                reasons[k] = str(e)
        if reasons and not (self.collab.degraded_ok and len(reasons) < len(calls)):
            raise PeerError(self._no_answer(reasons))

    def _reply(self, k: int, call, start: float):
        """The call's reply, waited for until the deadline (from `start`) at most."""
        left = self.deadline_s - (time.monotonic() - start)
        try:
            return call.result(timeout=max(left, 0) + GRACE_S)
        except grpc.FutureTimeoutError:
            call.cancel()
            raise _Missing(self._name(k, self._late())) from None
        except grpc.RpcError as e:
            raise _Missing(self._name(k, self._why(e))) from None

    def _streamed(self, k: int, call: Future, request_id: int, start: float) -> pb.Reply:
        """Part k's reply to the request, waited for until the deadline (from `start`) at most."""
        left = self.deadline_s - (time.monotonic() - start)
        try:
            reply = call.result(timeout=max(left, 0))
        except FutureTimeout:
            raise _Missing(self._name(k, self._late())) from None
        except grpc.RpcError as e:
            raise _Missing(self._name(k, self._why(e))) from None
        if reply.error:
            raise _Missing(self._name(k, f"refused the images: {reply.error}"))
        return reply

    def _features(self, k: int, reply: pb.Features, batch: int) -> np.ndarray:
        try:
            features = wire.array(reply.features)
        except ValueError as e:
            raise _Missing(self._name(k, f"malformed reply: {e}")) from None
        expected = (batch, self.collab.parts[k].output_dim)
        if features.shape != expected:
            raise _Missing(self._name(k, f"replied with features of shape {features.shape}, expected {expected}"))
        return features

    def _check(self, k: int, info: pb.PartInfo) -> None:
        """Refuse a peer that serves something else than part k of this bundle."""
        entry = self.collab.parts[k]
        served = (info.index, info.output_dim, tuple(info.input_shape))
        expected = (k, entry.output_dim, self.collab.input_shape)
        if served != expected:
            raise InputError(self._name(k, f"serves part {info.index} ({info.model}, output_dim {info.output_dim}, "
                                           f"input {tuple(info.input_shape)}), but part {k} of {self.collab.file} "
                                           f"is {entry.model}, output_dim {entry.output_dim}, input "
                                           f"{self.collab.input_shape}; --peers lists the peers in part order"))
        if info.bundle and info.bundle != self.bundle:
            raise InputError(self._name(k, f"serves another build of the bundle (identity {info.bundle[:12]}, this "
                                           f"one's {self.bundle[:12]}): copy this bundle to the peer"))
        if entry.sha256 and info.sha256 != entry.sha256:
            raise InputError(self._name(k, f"serves {info.model} with sha256 {info.sha256}, but {self.collab.file} "
                                           f"pins {entry.sha256}: the peer holds another build of the bundle"))
        self.checked[k] = True

    def _name(self, k: int, reason: str) -> str:
        return f"part {k} at {self.peers[k]}: {reason}"

    def _late(self) -> str:
        return f"no answer within {self.deadline_s * 1e3:g} ms"

    def _why(self, error: grpc.RpcError) -> str:
        code = error.code()
        details = next((line for line in (error.details() or "").splitlines() if line.strip()), code.name)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return self._late()
        if code == grpc.StatusCode.UNAVAILABLE:  # gRPC's text ends with the cause: "...: Connection refused"
            return f"unreachable ({details.rsplit(': ', 1)[-1]})"
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return f"does not serve evc's Part service ({details})"
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            return details
        if code == grpc.StatusCode.CANCELLED:
            return "the part ended its stream"
        return f"{code.name.lower()}: {details}"

    def _no_answer(self, reasons: dict[int, str]) -> str:
        text = "; ".join(reasons.values())
        if len(reasons) == len(self.peers):
            return f"no part answered: {text}"
        return (f"{text}; the fusion of {self.collab.folder} cannot answer without "
                f"{'it' if len(reasons) == 1 else 'them'} (collab.json's fusion.degraded_ok is false)")


class _Link:
    """One part's stream: requests go down it in order, each reply is matched to its request by id. A stream that
    ends fails the requests still waiting on it; the next request opens a new one."""

    def __init__(self, stub, bundle: str):
        self.stub, self.metadata = stub, ((wire.BUNDLE_KEY, bundle),)
        self.lock = threading.Lock()
        self.stream: _Stream | None = None

    def send(self, request_id: int, images: pb.Tensor) -> Future:
        future = Future()
        with self.lock:
            if self.stream is None or self.stream.ended:
                self.stream = _Stream(self.stub, self.metadata)
            self.stream.send(request_id, images, future)
        return future

    def forget(self, request_id: int) -> None:
        """A request given up on: its reply, if it comes, is dropped."""
        with self.lock:
            if self.stream is not None:
                self.stream.forget(request_id)

    def close(self) -> None:
        with self.lock:
            if self.stream is not None:
                self.stream.close()


class _Stream:
    """An open Stream call, the thread reading its replies, and the requests waiting for one."""

    def __init__(self, stub, metadata):
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.pending: dict[int, Future] = {}
        self.lock = threading.Lock()
        self.ended = False
        self.call = stub.Stream(iter(self.outbox.get, None), metadata=metadata)
        threading.Thread(target=self._receive, daemon=True, name="evc-collab-stream").start()

    def send(self, request_id: int, images: pb.Tensor, future: Future) -> None:
        with self.lock:
            if self.ended:
                future.set_exception(self.error)
                return
            self.pending[request_id] = future
        self.outbox.put(pb.Request(id=request_id, images=images))

    def forget(self, request_id: int) -> None:
        with self.lock:
            self.pending.pop(request_id, None)

    def close(self) -> None:
        self.outbox.put(None)  # the requests end: the part ends its side of the stream
        self.call.cancel()

    def _receive(self) -> None:
        try:
            for reply in self.call:
                with self.lock:
                    future = self.pending.pop(reply.id, None)
                if future is not None:
                    future.set_result(reply)
            error = grpc.RpcError()  # the part ended the stream without an error
            error.code, error.details = (lambda: grpc.StatusCode.CANCELLED), (lambda: "")
        except grpc.RpcError as e:
            error = e
        with self.lock:
            self.ended, self.error = True, error
            waiting, self.pending = list(self.pending.values()), {}
        self.outbox.put(None)
        for future in waiting:
            future.set_exception(error)


def parse_peers(text: str) -> list[str]:
    """`--peers HOST:PORT,HOST:PORT`, checked."""
    peers = [p.strip() for p in text.split(",")]
    for peer in peers:
        check_peer(peer)
    return peers


def check_peer(peer: str) -> None:
    host, _, port = peer.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or (":" in host and not bracketed) \
            or any(c.isspace() or c in "/," for c in host):
        raise InputError(f"--peers: {peer!r} is not HOST:PORT (e.g. 127.0.0.1:50051, or [::1]:50051 for IPv6)")
