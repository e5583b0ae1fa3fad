"""Tensors on the wire (shape, dtype, raw little-endian bytes) and the channel options both ends use.

Features are float32. Images are float32 when the caller preprocessed them, or uint8 pixels (B, C, H, W),
resized and cropped but not normalised: a quarter of the bytes, normalised by the part that receives them.
"""

from __future__ import annotations

import math

import numpy as np

from evc.runtime.collab import collab_pb2 as pb

DTYPES = {"float32": np.dtype("<f4"), "uint8": np.dtype("u1")}
# A batch of 224x224 images outgrows gRPC's default 4 MB limit on a message.
MAX_MESSAGE = 256 << 20
MESSAGE_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
# A peer that comes back is tried again within a second, not after gRPC's default backoff of up to two minutes.
CHANNEL_OPTIONS = MESSAGE_OPTIONS + [("grpc.initial_reconnect_backoff_ms", 200),
                                     ("grpc.min_reconnect_backoff_ms", 200),
                                     ("grpc.max_reconnect_backoff_ms", 1000)]
# gRPC binds with SO_REUSEPORT by default: a second server on a busy port would then share it, silently.
SERVER_OPTIONS = MESSAGE_OPTIONS + [("grpc.so_reuseport", 0)]
MAX_STREAMS = 64  # coordinators one served part answers at once, each on its stream
BUNDLE_KEY = "evc-bundle"  # a stream's metadata: the coordinator's bundle identity


def tensor(array: np.ndarray) -> pb.Tensor:
    """`array` as a message: uint8 stays uint8, anything else is sent as float32."""
    dtype = "uint8" if array.dtype == np.uint8 else "float32"
    array = np.ascontiguousarray(array, dtype=DTYPES[dtype])
    return pb.Tensor(shape=array.shape, dtype=dtype, data=array.tobytes())


def array(message: pb.Tensor, dtypes: tuple[str, ...] = ("float32",)) -> np.ndarray:
    """The tensor a message carries, of one of `dtypes`; ValueError says what is wrong with a malformed one."""
    shape = tuple(message.shape)
    if message.dtype not in dtypes:
        raise ValueError(f"dtype {message.dtype or 'unset'!r}, expected {' or '.join(dtypes)}")
    if any(n < 0 for n in shape):
        raise ValueError(f"negative size in shape {shape}")
    dtype = DTYPES[message.dtype]
    size = math.prod(shape) * dtype.itemsize
    if len(message.data) != size:
        raise ValueError(f"{len(message.data)} bytes for shape {shape} {message.dtype}, which takes {size}")
    return np.frombuffer(message.data, dtype=dtype).reshape(shape).astype(message.dtype, copy=False)


def address(host: str, port: int) -> str:
    """host:port as gRPC reads it, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
