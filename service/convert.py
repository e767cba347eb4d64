"""Tensors between protobuf and NumPy: shape + raw little-endian float32 bytes, without copies on
the way in (np.frombuffer over the request's bytes)."""

import math

import numpy as np

from vaeserve.errors import InvalidInput
from vaeserve.v1 import vaeserve_pb2 as pb

FLOAT32 = np.dtype("<f4")


def to_array(tensor: pb.Tensor, what: str) -> np.ndarray:
    shape = tuple(tensor.shape)
    if not shape:
        raise InvalidInput(f"{what}: missing; send a tensor with a shape and float32 data")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{what}: negative dimension in shape {list(shape)}")
    expected = FLOAT32.itemsize * math.prod(shape)
    if len(tensor.data) != expected:
        raise InvalidInput(
            f"{what}: shape {list(shape)} needs {expected} bytes of little-endian float32, got {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, FLOAT32).reshape(shape)


def to_tensor(array: np.ndarray) -> pb.Tensor:
    array = np.ascontiguousarray(array, FLOAT32)
    return pb.Tensor(shape=array.shape, data=array.tobytes())
