"""The coordinator: images to every served part at once, their features fused here into logits.

    with Coordinator(Path("build/devit/collab"), ["10.0.0.2:50051", "10.0.0.3:50051"]) as coordinator:
        answer = coordinator.infer(images)   # answer.logits, answer.degraded, answer.missing

Peers are listed in part order. At start each is asked what it serves
(Describe) and must serve the part, output width and input shape the bundle
says. Then every call sends the images to all parts in parallel and waits for
them within one deadline, never longer. A part that is down, slower than the
deadline or answers with a malformed reply is missing: when the fusion was
trained to do without parts (`degraded_ok`) and one part at least answered,
the answer is fused without it and marked degraded; otherwise PeerError names
the peer, its part and what went wrong.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from evc.errors import InputError, PeerError
from evc.runtime.collab import collab_pb2 as pb
from evc.runtime.collab import collab_pb2_grpc, wire
from evc.runtime.collab.contract import read
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
        request = pb.Images(images=wire.tensor(images))
        describes = {k: self.stubs[k].Describe.future(pb.Empty(), timeout=self.deadline_s)
                     for k, checked in enumerate(self.checked) if not checked}
        calls = [stub.Features.future(request, timeout=self.deadline_s) for stub in self.stubs]
        features, compute_ms, reasons = [], [], {}
        for k, call in enumerate(calls):
            try:
                if k in describes:
                    self._check(k, self._reply(k, describes[k], start))
                reply = self._reply(k, call, start)
                features.append(self._features(k, reply, len(images)))
                compute_ms.append(reply.compute_us / 1e3)
            except _Missing as e:
                call.cancel()
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
        return f"{code.name.lower()}: {details}"

    def _no_answer(self, reasons: dict[int, str]) -> str:
        text = "; ".join(reasons.values())
        if len(reasons) == len(self.peers):
            return f"no part answered: {text}"
        return (f"{text}; the fusion of {self.collab.folder} cannot answer without "
                f"{'it' if len(reasons) == 1 else 'them'} (collab.json's fusion.degraded_ok is false)")


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
