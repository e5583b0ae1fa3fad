"""A served part: its model loaded once and checked, images of the wrong shape refused, naming both shapes."""

import grpc
import numpy as np
import pytest

from evc.errors import InputError
from evc.runtime.collab import collab_pb2 as pb
from evc.runtime.collab import collab_pb2_grpc, wire
from evc.runtime.collab.contract import read
from evc.runtime.collab.runtime import part_model
from evc.runtime.collab.server import serve
from tests.runtime.collab.conftest import collab_of, images, write_collab


@pytest.fixture
def served(bundles):
    """Part 1 of the two-part bundle (its TFLite part), served in this process; a stub to call it."""
    server = serve(bundles["two"], 1, 0)
    channel = grpc.insecure_channel(server.address)
    try:
        yield collab_pb2_grpc.PartStub(channel)
    finally:
        channel.close()
        server.stop(0).wait(5)


def test_the_served_features_are_the_models_own(served, bundles):
    x = images(3)
    reply = served.Features(pb.Images(images=wire.tensor(x)), timeout=10)
    np.testing.assert_array_equal(wire.array(reply.features), part_model(read(bundles["two"]), 1)(x))


def test_describe_says_what_is_served(served):
    info = served.Describe(pb.Empty(), timeout=10)
    assert (info.index, info.output_dim, tuple(info.input_shape), info.model) == (1, 24, (3, 32, 32), "part1.tflite")
    assert len(info.sha256) == 64


@pytest.mark.parametrize("shape", [(1, 3, 28, 28), (3, 32, 32), (0, 3, 32, 32)])
def test_images_of_the_wrong_shape_are_invalid_argument_naming_both_shapes(served, shape):
    with pytest.raises(grpc.RpcError) as e:
        served.Features(pb.Images(images=wire.tensor(np.zeros(shape, np.float32))), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == (f"part 1: expected images of shape (B, 3, 32, 32) float32 or uint8, "
                                 f"received {shape} float32")


def test_uint8_pixels_are_normalised_by_the_part_as_the_eval_transform_does(served, bundles):
    pixels = np.random.default_rng(2).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    request = pb.Images(images=wire.tensor(pixels))
    assert request.images.dtype == "uint8" and len(request.images.data) == pixels.size
    reply = served.Features(request, timeout=10)
    collab = read(bundles["two"])
    normalised = collab.normalised(pixels)
    assert normalised.dtype == np.float32 and not np.array_equal(normalised, pixels)
    np.testing.assert_array_equal(wire.array(reply.features), part_model(collab, 1)(normalised))


def test_images_of_another_dtype_are_invalid_argument(served):
    message = wire.tensor(np.zeros((1, 3, 32, 32), np.float32))
    message.dtype = "float16"
    with pytest.raises(grpc.RpcError) as e:
        served.Features(pb.Images(images=message), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == "part 1: malformed images: dtype 'float16', expected float32 or uint8"


def test_a_truncated_request_is_invalid_argument(served):
    message = wire.tensor(np.zeros((1, 3, 32, 32), np.float32))
    message.data = message.data[:-4]
    with pytest.raises(grpc.RpcError) as e:
        served.Features(pb.Images(images=message), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "12284 bytes for shape (1, 3, 32, 32) float32, which takes 12288" in e.value.details()


def test_a_part_the_bundle_lacks_is_refused(bundles):
    with pytest.raises(InputError, match=r"--part 2: .* has parts 0 to 1"):
        serve(bundles["two"], 2, 0)


def test_a_part_whose_file_is_not_the_one_collab_json_pins_is_refused(bundles, tmp_path):
    bundle = tmp_path / "pinned"
    bundle.mkdir()
    for name in ("part0.onnx", "fusion.onnx"):
        (bundle / name).write_bytes((bundles["two"] / name).read_bytes())
    collab = collab_of(bundles["two"])
    collab["parts"][0]["sha256"] = "0" * 64
    write_collab(bundle, collab)
    with pytest.raises(InputError, match=r"part0.onnx: sha256 [0-9a-f]{64}, but .*collab.json's parts\[0\] pins 0{64}"):
        serve(bundle, 0, 0)


def test_a_model_that_does_not_give_output_dim_features_is_refused_at_load(bundles, tmp_path):
    bundle = tmp_path / "wrong"
    bundle.mkdir()
    (bundle / "part0.onnx").write_bytes((bundles["two"] / "part0.onnx").read_bytes())
    collab = collab_of(bundles["two"])
    collab["parts"][0]["output_dim"] = 15
    write_collab(bundle, collab)
    with pytest.raises(InputError, match=r"part0.onnx gives float32 of shape \(1, 16\) for one blank image; "
                                         r"collab.json's parts\[0\] says float32 of shape \(1, 15\)"):
        serve(bundle, 0, 0)


def test_a_missing_model_file_is_named_with_its_key(bundles, tmp_path):
    write_collab(tmp_path, collab_of(bundles["two"]))
    with pytest.raises(InputError, match=r"collab.json: parts\[1\].model: no such file .*part1.tflite"):
        serve(tmp_path, 1, 0)


def test_a_port_in_use_is_refused_rather_than_shared(bundles):
    """gRPC binds with SO_REUSEPORT unless told not to: a second server would silently share the port."""
    first = serve(bundles["two"], 0, 0)
    try:
        port = int(first.address.rsplit(":", 1)[1])
        with pytest.raises(InputError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve(bundles["two"], 0, port)
    finally:
        first.stop(0).wait(5)
