"""Tensors between protobuf and NumPy: vaeserve.v1's Tensor (shape + raw little-endian float32 bytes) and
the rows of an Open Inference Protocol tensor (raw bytes, or typed values), without copies on the way in
from bytes (np.frombuffer over the request's bytes).

Every shape problem is InvalidInput, found from the shape alone before anything is allocated: a tensor
must be [rows, width] with 1 <= rows <= the row limit and width the model's, and carry exactly
4 * rows * width bytes (or rows * width values).
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
    return rows(tuple(tensor.shape), what, width, max_rows, data=tensor.data)


def rows(shape: tuple, what: str, width: int, max_rows: int, *, data: bytes | None = None, values=None) -> np.ndarray:
    """[rows, width] float32 from `data` (raw little-endian bytes) or `values` (a sequence of floats)."""
    if not shape:
        raise InvalidInput(f"{what}: missing; send a tensor with a shape and float32 data")
    if len(shape) != 2:
        raise InvalidInput(f"{what}: expected a 2-D tensor [rows, {width}], got shape {_shape(shape)}")
    count, columns = shape
    if count < 0 or columns < 0:
        raise InvalidInput(f"{what}: negative dimension in shape {_shape(shape)}")
    if count == 0:
        raise InvalidInput(f"{what}: zero rows; send at least one")
    if count > max_rows:
        raise InvalidInput(f"{what}: {count} rows is more than the limit of {max_rows} per request")
    if columns != width:
        raise InvalidInput(f"{what}: the model takes {width} values per row, got {columns}")
    if data is None:
        if len(values) != count * columns:
            raise InvalidInput(f"{what}: shape {_shape(shape)} needs {count * columns} float32 values, got {len(values)}")
        return np.asarray(values, FLOAT32).reshape(shape)
    expected = FLOAT32.itemsize * count * columns
    if len(data) != expected:
        raise InvalidInput(
            f"{what}: shape {_shape(shape)} needs {expected} bytes of little-endian float32, got {len(data)}"
        )
    return np.frombuffer(data, FLOAT32).reshape(shape)


def to_tensor(array: np.ndarray) -> pb.Tensor:
    """A float32 Tensor of `array`: a float64 value past float32's range reads +-inf, as docs/api.md says
    (a support penalty of a value far outside), without NumPy's overflow warning in the server log."""
    with np.errstate(over="ignore"):
        array = np.ascontiguousarray(array, FLOAT32)
    return pb.Tensor(shape=array.shape, data=array.tobytes())
