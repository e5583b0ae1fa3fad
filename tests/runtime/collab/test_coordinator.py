"""The coordinator against parts served in their own processes, and against peers that misbehave: its
answers are local_infer's exactly, and a peer that fails is named within the deadline, never waited on."""

import time

import numpy as np
import pytest

from evc.errors import InputError, PeerError
from evc.runtime.collab import collab_pb2 as pb
from evc.runtime.collab import wire
from evc.runtime.collab.coordinator import Coordinator, parse_peers
from evc.runtime.collab.runtime import local_infer
from tests.runtime.collab.conftest import fake_part, free_port, images, variant

DEADLINE_S = 0.5


@pytest.mark.parametrize("name", ["two", "three"])
def test_served_parts_give_exactly_the_local_predictions(bundles, serve, name):
    bundle = bundles[name]
    x = images(4)
    with Coordinator(bundle, serve(bundle)) as coordinator:
        answer = coordinator.infer(x)
        again = coordinator.infer(x[:1])
    assert not answer.degraded and answer.missing == () and answer.logits.shape == (4, 10)
    np.testing.assert_array_equal(answer.logits, local_infer(bundle, x))
    np.testing.assert_array_equal(again.logits, answer.logits[:1])


def test_a_killed_part_is_named_within_the_deadline_when_the_fusion_needs_every_part(bundles, serve, tmp_path):
    strict = variant(bundles["three"], tmp_path / "strict", degraded_ok=False)
    peers = serve(strict)
    with Coordinator(strict, peers, deadline_s=DEADLINE_S) as coordinator:
        coordinator.infer(images(1))
        serve.processes[peers[1]].kill()
        start = time.monotonic()
        with pytest.raises(PeerError) as e:
            coordinator.infer(images(1))
    assert time.monotonic() - start < DEADLINE_S + 1
    assert str(e.value).startswith(f"part 1 at {peers[1]}: unreachable (")
    assert "fusion.degraded_ok is false" in str(e.value) and e.value.exit_code == 1


def test_a_killed_part_gives_the_local_answer_without_it_when_degraded_ok(bundles, serve):
    bundle = bundles["three"]
    peers = serve(bundle)
    x = images(2)
    with Coordinator(bundle, peers, deadline_s=DEADLINE_S) as coordinator:
        serve.processes[peers[2]].kill()
        start = time.monotonic()
        answer = coordinator.infer(x)
    assert time.monotonic() - start < DEADLINE_S + 1
    assert answer.degraded and answer.missing == (peers[2],)
    assert answer.reasons[0].startswith(f"part 2 at {peers[2]}: unreachable")
    np.testing.assert_array_equal(answer.logits, local_infer(bundle, x, missing=(2,)))
    assert not np.array_equal(answer.logits, local_infer(bundle, x))  # the part was really left out


def test_a_slow_part_is_named_no_answer_within_the_deadline(bundles, serve, tmp_path):
    strict = variant(bundles["two"], tmp_path / "strict", degraded_ok=False)
    with fake_part(strict, 1, delay_s=30) as slow:
        peers = [serve(strict, parts=[0])[0], slow]
        with Coordinator(strict, peers, deadline_s=0.3) as coordinator:
            start = time.monotonic()
            with pytest.raises(PeerError) as e:
                coordinator.infer(images(1))
            took = time.monotonic() - start
    assert took < 0.3 + 1
    assert str(e.value).startswith(f"part 1 at {slow}: no answer within 300 ms;")


def test_a_slow_part_is_left_out_when_degraded_ok(bundles, serve):
    bundle = bundles["two"]
    x = images(2)
    with fake_part(bundle, 0, delay_s=30) as slow:
        with Coordinator(bundle, [slow, serve(bundle, parts=[1])[0]], deadline_s=0.3) as coordinator:
            start = time.monotonic()
            answer = coordinator.infer(x)
            took = time.monotonic() - start
    assert took < 0.3 + 1
    assert answer.missing == (slow,) and answer.reasons == (f"part 0 at {slow}: no answer within 300 ms",)
    np.testing.assert_array_equal(answer.logits, local_infer(bundle, x, missing=(0,)))


def _shaped(shape):
    return lambda x: pb.Features(features=wire.tensor(np.zeros(shape(len(x)), np.float32)))


def _truncated(x):
    message = wire.tensor(np.zeros((len(x), 24), np.float32))
    message.data = message.data[:-3]
    return pb.Features(features=message)


def _float16(x):
    message = wire.tensor(np.zeros((len(x), 24), np.float32))
    message.dtype = "float16"
    return pb.Features(features=message)


@pytest.mark.parametrize("reply, why", [
    (_shaped(lambda b: (b, 23)), "replied with features of shape (2, 23), expected (2, 24)"),
    (_shaped(lambda b: (1, 24)), "replied with features of shape (1, 24), expected (2, 24)"),
    (_shaped(lambda b: (b, 24, 1)), "replied with features of shape (2, 24, 1), expected (2, 24)"),
    (_truncated, "malformed reply: 189 bytes for shape (2, 24) float32, which takes 192"),
    (_float16, "malformed reply: dtype 'float16', expected float32"),
])
def test_a_malformed_reply_is_refused_naming_the_peer(bundles, serve, tmp_path, reply, why):
    strict = variant(bundles["two"], tmp_path / "strict", degraded_ok=False)
    with fake_part(strict, 1, reply=reply) as bad:
        with Coordinator(strict, [serve(strict, parts=[0])[0], bad], deadline_s=5) as coordinator:
            with pytest.raises(PeerError) as e:
                coordinator.infer(images(2))
    assert str(e.value).startswith(f"part 1 at {bad}: {why};")


def test_a_malformed_reply_is_left_out_when_degraded_ok(bundles, serve):
    bundle = bundles["two"]
    x = images(2)
    with fake_part(bundle, 1, reply=_truncated) as bad:
        with Coordinator(bundle, [serve(bundle, parts=[0])[0], bad], deadline_s=5) as coordinator:
            answer = coordinator.infer(x)
    assert answer.degraded and answer.missing == (bad,) and "malformed reply" in answer.reasons[0]
    np.testing.assert_array_equal(answer.logits, local_infer(bundle, x, missing=(1,)))


def test_peers_in_the_wrong_order_are_refused_at_start_naming_the_peer(bundles, serve):
    bundle = bundles["two"]
    peers = serve(bundle)
    with pytest.raises(InputError) as e:
        Coordinator(bundle, peers[::-1])
    assert str(e.value).startswith(f"part 0 at {peers[1]}: serves part 1 (part1.tflite, output_dim 24, ")
    assert "--peers lists the peers in part order" in str(e.value)


def test_a_peer_serving_another_index_of_the_same_width_is_refused_at_start(bundles):
    bundle = bundles["two"]
    with fake_part(bundle, 0, index=1) as liar, fake_part(bundle, 1) as honest:
        with pytest.raises(InputError, match=f"^part 0 at {liar}: serves part 1 \\(part0.onnx, output_dim 16"):
            Coordinator(bundle, [liar, honest])


def test_a_peer_down_at_start_is_named_when_the_fusion_needs_every_part(bundles, serve, tmp_path):
    strict = variant(bundles["two"], tmp_path / "strict", degraded_ok=False)
    peers = [serve(strict, parts=[0])[0], f"127.0.0.1:{free_port()}"]
    start = time.monotonic()
    with pytest.raises(PeerError, match=f"^part 1 at {peers[1]}: unreachable"):
        Coordinator(strict, peers, deadline_s=DEADLINE_S)
    assert time.monotonic() - start < DEADLINE_S + 1


def test_no_peer_at_all_is_named_even_when_degraded_ok(bundles):
    peers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    start = time.monotonic()
    with pytest.raises(PeerError, match=f"^no part answered: part 0 at {peers[0]}: .*; part 1 at {peers[1]}: "):
        Coordinator(bundles["two"], peers, deadline_s=DEADLINE_S)
    assert time.monotonic() - start < DEADLINE_S + 1


def test_a_part_down_at_start_is_checked_and_used_once_it_comes_back(bundles, serve):
    bundle = bundles["two"]
    port = free_port()
    first = serve(bundle, parts=[0])[0]
    x = images(1)
    with Coordinator(bundle, [first, f"127.0.0.1:{port}"], deadline_s=DEADLINE_S) as coordinator:
        assert coordinator.infer(x).degraded
        serve(bundle, parts=[1], ports=[port])
        deadline = time.monotonic() + 10  # gRPC reconnects within its backoff, a second at most
        while (answer := coordinator.infer(x)).degraded and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not answer.degraded
    np.testing.assert_array_equal(answer.logits, local_infer(bundle, x))


def test_a_part_down_at_start_that_comes_back_serving_another_part_is_refused(bundles, serve):
    bundle = bundles["two"]
    port = free_port()
    x = images(1)
    with Coordinator(bundle, [serve(bundle, parts=[0])[0], f"127.0.0.1:{port}"], deadline_s=DEADLINE_S) as coordinator:
        assert coordinator.infer(x).degraded
        with fake_part(bundle, 1, index=0, port=port):
            deadline = time.monotonic() + 10
            with pytest.raises(InputError, match=f"^part 1 at 127.0.0.1:{port}: serves part 0 "):
                while coordinator.infer(x).degraded and time.monotonic() < deadline:
                    time.sleep(0.1)


def test_images_of_the_wrong_shape_are_refused_before_any_call(bundles):
    with fake_part(bundles["two"], 0) as a, fake_part(bundles["two"], 1) as b:
        with Coordinator(bundles["two"], [a, b]) as coordinator:
            with pytest.raises(InputError, match=r"expected images of shape \(B, 3, 32, 32\) float32 or uint8, "
                                                 r"received \(1, 3, 32, 31\) float32"):
                coordinator.infer(np.zeros((1, 3, 32, 31), np.float32))


def test_as_many_peers_as_parts_are_needed(bundles):
    with pytest.raises(InputError, match="has 2 parts, so it takes 2 peers, in part order; got 1"):
        Coordinator(bundles["two"], ["127.0.0.1:1"])


@pytest.mark.parametrize("text", ["foo", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:99999", "host:port",
                                  "127.0.0.1:50051,", "::1:50051", "a b:1"])
def test_a_bad_peers_string_is_refused(text):
    with pytest.raises(InputError, match="is not HOST:PORT"):
        parse_peers(text)


def test_peers_parse_with_hostnames_and_ipv6():
    assert parse_peers("edge-1:50051, [::1]:50052") == ["edge-1:50051", "[::1]:50052"]
