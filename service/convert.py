"""Tensors between protobuf and NumPy: shape + raw little-endian float32 bytes, without copies on
the way in (np.frombuffer over the request's bytes).

Every shape problem is InvalidInput, found from the shape alone before anything is allocated: a tensor
must be [rows, width] with 1 <= rows <= the row limit and width the model's, and carry exactly
4 * rows * width bytes.
"""

import numpy as np

from vaeserve.errors import InvalidInput
from vaeserve.v1 import vaeserve_pb2 as pb

FLOAT32 = np.dtype("<f4")
SHOWN_DIMS = 8  # dimensions of a wrong shape an error message repeats


def _shape(shape) -> str:
    dims = [str(d) for d in shape[:SHOWN_DIMS]]
    return f"[{', '.join(dims)}{f', ... ({len(shape)} dimensions)' if len(shape) > SHOWN_DIMS else ''}]"


def to_array(tensor: pb.Tensor, what: str, width: int, max_rows: int) -> np.ndarray:
    shape = tuple(tensor.shape)
    if not shape:
        raise InvalidInput(f"{what}: missing; send a tensor with a shape and float32 data")
    if len(shape) != 2:
        raise InvalidInput(f"{what}: expected a 2-D tensor [rows, {width}], got shape {_shape(shape)}")
    rows, columns = shape
    if rows < 0 or columns < 0:
        raise InvalidInput(f"{what}: negative dimension in shape {_shape(shape)}")
    if rows == 0:
        raise InvalidInput(f"{what}: zero rows; send at least one")
    if rows > max_rows:
        raise InvalidInput(f"{what}: {rows} rows is more than the limit of {max_rows} per request")
    if columns != width:
        raise InvalidInput(f"{what}: the model takes {width} values per row, got {columns}")
    expected = FLOAT32.itemsize * rows * columns
    if len(tensor.data) != expected:
        raise InvalidInput(
            f"{what}: shape {_shape(shape)} needs {expected} bytes of little-endian float32, got {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, FLOAT32).reshape(shape)


def to_tensor(array: np.ndarray) -> pb.Tensor:
    array = np.ascontiguousarray(array, FLOAT32)
    return pb.Tensor(shape=array.shape, data=array.tobytes())
