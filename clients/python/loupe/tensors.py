"""Conversion between numpy arrays and ``loupe.v1.Tensor`` messages."""

from __future__ import annotations

import math

import numpy as np

from loupe.v1 import types_pb2

_TO_DTYPE = {
    np.dtype("float32"): types_pb2.DTYPE_FLOAT32,
    np.dtype("float16"): types_pb2.DTYPE_FLOAT16,
    np.dtype("int8"): types_pb2.DTYPE_INT8,
}
_FROM_DTYPE = {v: k for k, v in _TO_DTYPE.items()}


class TensorError(ValueError):
    """A Tensor message is malformed (unknown dtype, shape/data mismatch)."""


def to_tensor(array: np.ndarray, scale: float = 0.0) -> types_pb2.Tensor:
    """Encode an array as a little-endian, row-major ``Tensor``.

    Parameters
    ----------
    array : np.ndarray
        float32, float16 or int8 array of any shape.
    scale : float
        Dequantisation scale for int8 data.
    """
    arr = np.ascontiguousarray(array)
    if arr.dtype not in _TO_DTYPE:
        arr = arr.astype(np.float32)
    return types_pb2.Tensor(
        shape=list(arr.shape),
        dtype=_TO_DTYPE[arr.dtype],
        data=arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes(),
        scale=scale,
    )


def from_tensor(tensor: types_pb2.Tensor, *, field: str = "tensor", dequantize: bool = True) -> np.ndarray:
    """Decode a ``Tensor`` into a numpy array (float32 unless int8 is kept).

    Raises
    ------
    TensorError
        When the dtype is unknown or the data size does not match the shape; the message
        names ``field``.
    """
    if tensor.dtype not in _FROM_DTYPE:
        raise TensorError(f"{field}: dtype must be FLOAT32, FLOAT16 or INT8")
    dtype = _FROM_DTYPE[tensor.dtype].newbyteorder("<")
    shape = tuple(int(s) for s in tensor.shape)
    if any(s < 0 for s in shape):
        raise TensorError(f"{field}: negative dimension in shape {list(shape)}")
    count = math.prod(shape) if shape else 0  # Python ints: no int64 overflow on hostile shapes
    if count * dtype.itemsize != len(tensor.data):
        raise TensorError(
            f"{field}: shape {list(shape)} needs {count * dtype.itemsize} bytes of data, got {len(tensor.data)}"
        )
    try:
        arr = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    except ValueError:  # e.g. shape [] with no data
        raise TensorError(f"{field}: data cannot take shape {list(shape)}") from None
    if tensor.dtype == types_pb2.DTYPE_INT8:
        if not dequantize:
            return arr.astype(np.int8)
        return arr.astype(np.float32) * (tensor.scale or 1.0 / 127.0)
    return arr.astype(np.float32)


def is_empty(tensor: types_pb2.Tensor) -> bool:
    """True when the message carries no array (unset or zero-sized)."""
    return len(tensor.shape) == 0 and not tensor.data
