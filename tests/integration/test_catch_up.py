"""Catch-up between two real shard servers (gRPC on loopback, LMDB, faiss): the merge copies
newer records and tombstones both ways, pages through the version lists, and leaves equal
digests; a replica that is new and empty receives the whole shard."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from services.broker.backends import GrpcShardClient
from services.broker.catch_up import merge
from services.common.grpc_server import ServerOptions
from services.index.servicer import create_server
from services.index.store import LocalStore, StoredImage

D = 16


def rec(name: str, seed: int) -> StoredImage:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(D).astype(np.float32)
    local = LocalStore.quantize(rng.random((5, 4)) * 100, rng.standard_normal((5, 8)))
    return StoredImage(name, v / np.linalg.norm(v), rng.standard_normal((3, D)).astype(np.float16), local, {"seed": str(seed)}, 64, 48)


@pytest.fixture
def two_shards(tmp_path):
    servers = [create_server(0, ServerOptions(host="127.0.0.1", port=0), data_dir=str(tmp_path / f"r{j}")) for j in range(2)]
    yield [s for _, s in servers], [f"127.0.0.1:{r.port}" for r, _ in servers]
    for running, servicer in servers:
        running.stop(0)
        servicer.index.close()


def _merge(addresses: list[str], page: int):
    async def go():
        a, b = (GrpcShardClient(0, addr, ServerOptions().channel_options()) for addr in addresses)
        try:
            return await merge(0, a, b, page=page)
        finally:
            await a.close()
            await b.close()

    return asyncio.run(go())


def test_merge_copies_newer_writes_both_ways_and_deletes_stay_deleted(two_shards):
    (a, b), addresses = two_shards
    common = [rec(f"common-{i:03d}", i) for i in range(40)]
    a.index.add(common, [100] * 40)
    b.index.add(common, [100] * 40)
    a.index.add([rec(f"only-a-{i}", 1000 + i) for i in range(7)], [200] * 7)  # b missed these
    b.index.add([rec("only-b", 5000)], [201])  # a missed this one
    a.index.delete(["common-005"], [300])  # b missed a delete: its older record must go
    b.index.add([rec("common-010", 77)], [301])  # b holds a newer version of one id
    b.index.delete(["common-020"], [99])  # an older delete than the record: changes nothing
    report = _merge(addresses, page=8)  # several pages of version entries
    assert (report.records_to_b, report.deletes_to_b, report.records_to_a, report.deletes_to_a) == (7, 1, 2, 0)
    sa, sb = a.index.stats(), b.index.stats()
    assert sa["digest"] == sb["digest"] and sa["images"] == sb["images"] == 40 - 1 + 7 + 1
    assert a.index.get("common-005") is None and b.index.get("common-005") is None
    assert a.index.get("common-010").metadata == {"seed": "77"}
    copied = b.index.get("only-a-3")
    original = a.index.get("only-a-3")
    assert copied.metadata == original.metadata and np.array_equal(copied.vector, original.vector)
    assert np.array_equal(copied.regional, original.regional) and np.array_equal(copied.local.keypoints, original.local.keypoints)
    assert _merge(addresses, page=8).copied == 0  # merged replicas have nothing left to exchange


def test_an_empty_replica_receives_the_whole_shard(two_shards):
    (a, b), addresses = two_shards
    a.index.add([rec(f"img-{i:04d}", i) for i in range(300)], list(range(1, 301)))
    a.index.delete([f"img-{i:04d}" for i in range(0, 300, 10)], [400] * 30)
    report = _merge(addresses, page=64)
    assert report.records_to_b == 270 and report.deletes_to_b == 30 and report.compared == 300
    assert a.index.stats()["digest"] == b.index.stats()["digest"]
    q = a.index.get("img-0123").vector
    assert a.index.search(q, 5).ids == b.index.search(q, 5).ids


@pytest.mark.parametrize("bad", ["", "a" * 600])
def test_replication_rpcs_refuse_ids_no_store_can_hold(two_shards, bad):
    """An empty or over-long id is no LMDB key: INVALID_ARGUMENT naming the field, never INTERNAL
    (the internal-port fuzzer found GetRecords answering INTERNAL for "")."""
    import grpc

    from loupe.v1 import shard_pb2, shard_pb2_grpc

    _, addresses = two_shards
    with grpc.insecure_channel(addresses[0]) as channel:
        stub = shard_pb2_grpc.ShardStub(channel)
        calls = [
            (stub.GetRecords, shard_pb2.GetRecordsRequest(shard_id=0, ids=["ok", bad]), "ids[1]"),
            (stub.GetFeatures, shard_pb2.GetFeaturesRequest(shard_id=0, ids=[bad], want_global=True), "ids[0]"),
        ]
        if bad:  # "" is "from the start" for a cursor
            calls += [(stub.ListVersions, shard_pb2.ListVersionsRequest(shard_id=0, after=bad, limit=10), "after"),
                      (stub.ListVersions, shard_pb2.ListVersionsRequest(shard_id=0, upto=bad, limit=10), "upto")]
        for fn, req, field in calls:
            with pytest.raises(grpc.RpcError) as err:
                fn(req, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(field), err.value.details()
