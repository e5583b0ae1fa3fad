"""Tensors on the wire (shape, dtype, raw little-endian float32 bytes) and the channel options both ends use."""

from __future__ import annotations

import math

import numpy as np

from evc.collab import collab_pb2 as pb

FLOAT32 = np.dtype("<f4")
# A batch of 224x224 images outgrows gRPC's default 4 MB limit on a message.
MAX_MESSAGE = 256 << 20
MESSAGE_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
# A peer that comes back is tried again within a second, not after gRPC's default backoff of up to two minutes.
CHANNEL_OPTIONS = MESSAGE_OPTIONS + [("grpc.initial_reconnect_backoff_ms", 200),
                                     ("grpc.min_reconnect_backoff_ms", 200),
                                     ("grpc.max_reconnect_backoff_ms", 1000)]
# gRPC binds with SO_REUSEPORT by default: a second server on a busy port would then share it, silently.
SERVER_OPTIONS = MESSAGE_OPTIONS + [("grpc.so_reuseport", 0)]


def tensor(array: np.ndarray) -> pb.Tensor:
    array = np.ascontiguousarray(array, dtype=FLOAT32)
    return pb.Tensor(shape=array.shape, dtype="float32", data=array.tobytes())


def array(message: pb.Tensor) -> np.ndarray:
    """The tensor a message carries; ValueError says what is wrong with a malformed one."""
    shape = tuple(message.shape)
    if message.dtype != "float32":
        raise ValueError(f"dtype {message.dtype or 'unset'!r}, expected float32")
    if any(n < 0 for n in shape):
        raise ValueError(f"negative size in shape {shape}")
    size = math.prod(shape) * FLOAT32.itemsize
    if len(message.data) != size:
        raise ValueError(f"{len(message.data)} bytes for shape {shape} float32, which takes {size}")
    return np.frombuffer(message.data, dtype=FLOAT32).reshape(shape).astype(np.float32, copy=False)


def address(host: str, port: int) -> str:
    """host:port as gRPC reads it, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
