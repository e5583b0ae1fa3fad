"""The parts' long-lived streams under load and faults: many coordinators at once, a part killed while they
run, a part holding another build; every image gets an answer or a named error within its deadline, and
nothing hangs or is left running."""

import threading
import time

import grpc
import numpy as np
import pytest

from evc.errors import InputError, PeerError
from evc.runtime.collab import collab_pb2 as pb
from evc.runtime.collab import collab_pb2_grpc, wire
from evc.runtime.collab.coordinator import Coordinator
from evc.runtime.collab.runtime import local_infer
from tests.runtime.collab.conftest import collab_of, images, write_collab

DEADLINE_S = 2.0


def streams() -> int:
    return sum(t.name == "evc-collab-stream" for t in threading.enumerate())


def clients(bundle, peers, count: int, calls: int, x, deadline_s: float = DEADLINE_S, between_s: float = 0.0,
            until: threading.Event | None = None):
    """`count` coordinators in their own threads, `calls` infers each (and, with `until`, more until it is set,
    then 3 more); per client, each call's (answer or error, seconds it took)."""
    results = [[] for _ in range(count)]

    def more(made: int) -> bool:
        if until is None:
            return made < calls
        return made < calls or not until.is_set() or made < calls + 3

    def run(i):
        with Coordinator(bundle, peers, deadline_s=deadline_s) as coordinator:
            while more(len(results[i])):
                start = time.monotonic()
                try:
                    outcome = coordinator.infer(x)
                except PeerError as e:
                    outcome = e
                results[i].append((outcome, time.monotonic() - start))
                time.sleep(between_s)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads), "a client hung"
    return results


@pytest.mark.slow
def test_eight_coordinators_at_once_each_get_the_local_answer_for_every_image(bundles, serve):
    bundle = bundles["three"]
    x = images(2)
    expected = local_infer(bundle, x)
    before = streams()
    results = clients(bundle, serve(bundle), count=8, calls=10, x=x)
    for outcomes in results:
        assert len(outcomes) == 10
        for answer, took in outcomes:
            assert not isinstance(answer, PeerError), answer
            assert not answer.degraded and took < DEADLINE_S + 0.5
            np.testing.assert_array_equal(answer.logits, expected)
    time.sleep(0.5)
    assert streams() == before  # every coordinator's streams ended with it


@pytest.mark.slow
def test_a_part_killed_under_load_gives_degraded_answers_marked_so_and_then_full_ones_again(bundles, serve):
    bundle = bundles["three"]
    peers = serve(bundle)
    port = int(peers[1].rsplit(":", 1)[1])
    x = images(1)
    full, without = local_infer(bundle, x), local_infer(bundle, x, missing=(1,))

    back = threading.Event()

    def fault():
        time.sleep(1.0)
        serve.processes[peers[1]].kill()
        time.sleep(1.5)
        serve(bundle, parts=[1], ports=[port])  # back, on the same address
        time.sleep(1.5)  # a reconnect after gRPC's backoff (at most a second)
        back.set()

    faulting = threading.Thread(target=fault)
    faulting.start()
    results = clients(bundle, peers, count=4, calls=20, x=x, between_s=0.1, until=back)
    faulting.join(120)
    degraded = 0
    for outcomes in results:
        for answer, took in outcomes:
            assert not isinstance(answer, PeerError), answer  # degraded_ok: one part missing still answers
            assert took < DEADLINE_S + 0.5
            if answer.degraded:
                degraded += 1
                assert answer.missing == (peers[1],)
                np.testing.assert_allclose(answer.logits, without, rtol=0, atol=1e-6)
            else:
                np.testing.assert_allclose(answer.logits, full, rtol=0, atol=1e-6)
        assert not outcomes[-1][0].degraded  # the part came back, and its stream with it
    assert degraded > 0


def test_a_peer_holding_another_build_of_the_bundle_is_refused_at_start(bundles, serve, tmp_path):
    import shutil

    bundle = bundles["two"]
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    collab = collab_of(other)
    collab["deadline_ms"] = 1999  # another build: its collab.json differs, its models do not
    write_collab(other, collab)
    peers = serve(other)
    with pytest.raises(InputError, match="serves another build of the bundle"):
        Coordinator(bundle, peers)


def test_a_stream_opened_for_another_build_is_refused_by_the_part(bundles, serve):
    (peer,) = serve(bundles["two"], parts=[0])
    with grpc.insecure_channel(peer, options=wire.CHANNEL_OPTIONS) as channel:
        stub = collab_pb2_grpc.PartStub(channel)
        request = pb.Request(id=7, images=wire.tensor(images(1)))
        ours = stub.Describe(pb.Empty(), timeout=5).bundle
        (reply,) = stub.Stream(iter([request]), metadata=((wire.BUNDLE_KEY, ours),), timeout=5)
        assert reply.id == 7 and not reply.error
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Stream(iter([request]), metadata=((wire.BUNDLE_KEY, "0" * 64),), timeout=5))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "serves another build of the bundle" in caught.value.details()


def test_images_a_part_refuses_on_its_stream_are_named_and_the_stream_goes_on(bundles, serve):
    (peer,) = serve(bundles["two"], parts=[0])
    with grpc.insecure_channel(peer, options=wire.CHANNEL_OPTIONS) as channel:
        stub = collab_pb2_grpc.PartStub(channel)
        bad = pb.Request(id=1, images=wire.tensor(np.zeros((1, 3, 8, 8), np.float32)))
        good = pb.Request(id=2, images=wire.tensor(images(1)))
        first, second = stub.Stream(iter([bad, good]), timeout=5)
    assert first.id == 1 and "expected" in first.error and "(1, 3, 8, 8)" in first.error
    assert second.id == 2 and not second.error and tuple(second.features.shape) == (1, 16)
