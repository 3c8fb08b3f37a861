"""The caller limits of services/common/limits.py (pure checks)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loupe.v1 import types_pb2
from services.common import limits
from services.common.errors import InvalidArgument


@pytest.mark.parametrize("value", ["a", "coffee/0", "é" * 255, "x" * limits.MAX_ID_BYTES])
def test_good_ids(value):
    limits.check_id(value, "id")


@pytest.mark.parametrize("value, why", [
    ("", "empty"), ("x" * (limits.MAX_ID_BYTES + 1), "bytes"), ("é" * 256, "bytes"), ("😀" * 128, "bytes"),
    ("a\x00b", "control"), ("a\nb", "control"), ("a\x7fb", "control"), ("a\x85b", "control"), ("\ud800", "UTF-8"),
])
def test_bad_ids_name_the_field_and_reason(value, why):
    with pytest.raises(InvalidArgument, match=f"^images\\[3\\].id: .*{why}"):
        limits.check_id(value, "images[3].id")


def test_metadata_limits():
    limits.check_metadata({"title": "t", "empty": ""}, "metadata")
    too_many = {f"k{i}": "v" for i in range(limits.MAX_METADATA_ENTRIES + 1)}
    for md in (too_many, {"k": "v" * (limits.MAX_METADATA_VALUE_BYTES + 1)}, {"": "v"}, {"k\x01": "v"},
               {f"k{i}": "v" * 1000 for i in range(5)}):
        with pytest.raises(InvalidArgument, match="^metadata"):
            limits.check_metadata(md, "metadata")


def _vec(shape, data: bytes = b"", dtype=types_pb2.DTYPE_FLOAT32, scale=0.0) -> types_pb2.Tensor:
    return types_pb2.Tensor(shape=shape, dtype=dtype, data=data, scale=scale)


def test_vector_limits():
    limits.check_vector(_vec([8], np.ones(8, np.float32).tobytes()), "vector")
    bad = [
        _vec([]), _vec([0]), _vec([limits.MAX_VECTOR_DIM + 1]), _vec([2, 4], np.ones(8, np.float32).tobytes()),
        _vec([2**31 - 1, 2**31 - 1]), _vec([8], b"\0" * 31), _vec([8], b"\0" * 32, dtype=7),
        _vec([8], b"\0" * 8, dtype=types_pb2.DTYPE_INT8, scale=math.nan),
    ]
    for t in bad:
        with pytest.raises(InvalidArgument, match="^vector"):
            limits.check_vector(t, "vector")


@pytest.mark.parametrize("box", [(math.nan, 0, 10, 10), (0, 0, math.inf, 10), (5, 0, 5, 10), (0, 10, 10, 2), (-1, 0, 10, 10), (0, 0, 2e6, 10)])
def test_bad_crops(box):
    with pytest.raises(InvalidArgument, match="^crop"):
        limits.check_crop(types_pb2.Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3]))


def test_good_crop_and_ranges():
    limits.check_crop(types_pb2.Box(x1=0, y1=0, x2=10.5, y2=20))
    limits.check_finite_range(0.5, "a", 0.0, 1.0, lo_open=True, hi_open=True)
    for v in (math.nan, math.inf, 0.0, 1.0):
        with pytest.raises(InvalidArgument, match="^a: must be in \\(0, 1\\)"):
            limits.check_finite_range(v, "a", 0.0, 1.0, lo_open=True, hi_open=True)
    with pytest.raises(InvalidArgument, match="^n: must be in 0..5"):
        limits.check_int_range(6, "n", 0, 5)


def test_image_bytes():
    limits.check_image_bytes(b"x", "image")
    with pytest.raises(InvalidArgument, match="^image: empty"):
        limits.check_image_bytes(b"", "image")
