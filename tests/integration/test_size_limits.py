"""Size limits enforced by the shard itself and answers built under the message limit (issue 24
item 2), on real parts: a real Shard gRPC server behind the internal token, the broker's own
create_server, calls over loopback. Records are written straight into the shard's index (random
vectors, no extraction); "old" records above today's limits are written through the index API,
which bypasses the servicer's checks, as records stored before the limits existed were."""

from __future__ import annotations

import asyncio
import secrets
import socket

import grpc
import numpy as np
import pytest

from loupe.tensors import to_tensor
from loupe.v1 import retrieval_pb2, retrieval_pb2_grpc, shard_pb2, shard_pb2_grpc
from services.broker.servicer import create_server as create_broker
from services.common import limits
from services.common.auth import AuthPolicy
from services.common.grpc_server import ServerOptions
from services.index.servicer import create_server as create_shard
from services.index.store import LocalStore, StoredImage

TOKEN = secrets.token_urlsafe(32)
AUTH = (("authorization", f"Bearer {TOKEN}"),)
DIM = 32
N_IMAGES = 600
MiB = limits.MiB


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _full_metadata(i: int) -> dict[str, str]:
    """Exactly the 4 KiB limit: two keys, values filling the rest."""
    meta = {"name": f"img{i:04d}", "blob": ""}
    meta["blob"] = "x" * (limits.MAX_METADATA_BYTES - sum(len(k) + len(v) for k, v in meta.items()))
    return meta


@pytest.fixture
def shard(tmp_path):
    """A real Shard server (id 0, internal token required) with N_IMAGES images, each carrying
    exactly 4 KiB of metadata."""
    opts = ServerOptions(host="127.0.0.1", port=0, auth=AuthPolicy.internal(TOKEN))
    running, servicer = create_shard(0, opts, data_dir=str(tmp_path / "shard-000"))
    vecs = _unit(np.random.default_rng(0), N_IMAGES)
    servicer.index.add([StoredImage(f"img{i:04d}", vecs[i], None, None, _full_metadata(i)) for i in range(N_IMAGES)])
    yield running, servicer
    running.stop(0)
    servicer.index.close()


def _shard_stub(running) -> tuple[grpc.Channel, shard_pb2_grpc.ShardStub]:
    ch = grpc.insecure_channel(f"127.0.0.1:{running.port}", options=ServerOptions().channel_options())
    return ch, shard_pb2_grpc.ShardStub(ch)


def _with_broker(running, scenario):
    """Run ``scenario(stub)`` against a real broker over the shard (no extractor needed)."""

    async def run():
        broker = await create_broker([_dead_address()], [f"127.0.0.1:{running.port}"], ServerOptions(host="127.0.0.1", port=0),
                                     internal_token=TOKEN)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{broker.port}", options=ServerOptions().channel_options()) as ch:
                return await scenario(retrieval_pb2_grpc.RetrievalStub(ch))
        finally:
            await broker.stop(0)

    return asyncio.run(run())


def _vector_query(seed: int, k: int) -> retrieval_pb2.SearchRequest:
    return retrieval_pb2.SearchRequest(vector=to_tensor(_unit(np.random.default_rng(seed), 1)[0]), k=k)


def test_a_shard_refuses_25_mib_of_metadata_naming_the_field_and_keeps_serving(shard):
    running, servicer = shard
    ch, stub = _shard_stub(running)
    with ch:
        rec = shard_pb2.ShardRecord(id="huge", metadata={"blob": "x" * (25 * MiB)})
        rec.features.__getattribute__("global").CopyFrom(to_tensor(_unit(np.random.default_rng(1), 1)[0]))
        with pytest.raises(grpc.RpcError) as err:
            stub.Add(shard_pb2.ShardAddRequest(shard_id=0, records=[rec]), metadata=AUTH, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "records[0].metadata" in err.value.details()
        # the other per-image bounds, checked on the declared shapes
        bad = shard_pb2.ShardRecord(id="regions")
        bad.features.__getattribute__("global").CopyFrom(to_tensor(_unit(np.random.default_rng(2), 1)[0]))
        bad.features.regional.CopyFrom(to_tensor(np.zeros((limits.MAX_REGIONS_PER_IMAGE + 1, DIM), np.float16)))
        with pytest.raises(grpc.RpcError) as err:
            stub.Add(shard_pb2.ShardAddRequest(shard_id=0, records=[bad]), metadata=AUTH, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "records[0].features.regional" in err.value.details()
        nan = shard_pb2.ShardRecord(id="nan")
        nan.features.__getattribute__("global").CopyFrom(to_tensor(np.full(DIM, np.nan, np.float32)))
        with pytest.raises(grpc.RpcError) as err:
            stub.Add(shard_pb2.ShardAddRequest(shard_id=0, records=[nan]), metadata=AUTH, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "records[0].features.global" in err.value.details()
        # still serving, nothing of the refused writes stored
        resp = stub.Search(shard_pb2.ShardSearchRequest(shard_id=0, query=to_tensor(_unit(np.random.default_rng(3), 1)[0]), top_k=5),
                           metadata=AUTH, timeout=30)
        assert len(resp.ids) == 5
        assert len(servicer.index) == N_IMAGES


def test_a_shard_refuses_a_batch_whose_answer_could_exceed_the_message_limit(shard):
    running, _ = shard
    ch, stub = _shard_stub(running)
    q = to_tensor(_unit(np.random.default_rng(4), 1)[0])
    with ch:
        req = shard_pb2.ShardSearchBatchRequest(shard_id=0, queries=[shard_pb2.ShardSearchRequest(query=q, top_k=1000)] * 64)
        with pytest.raises(grpc.RpcError) as err:  # 64 x 600 hits x 4 KiB: 160 MB if it were answered
            stub.SearchBatch(req, metadata=AUTH, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "queries:" in err.value.details() and "64 MiB message limit" in err.value.details()
        # what fits by construction is answered in full
        req = shard_pb2.ShardSearchBatchRequest(shard_id=0, queries=[shard_pb2.ShardSearchRequest(query=q, top_k=1000)] * 12)
        resp = stub.SearchBatch(req, metadata=AUTH, timeout=60)
        assert [r.code for r in resp.results] == [0] * 12
        assert all(len(r.response.ids) == N_IMAGES for r in resp.results)
        assert resp.ByteSize() > 12 * N_IMAGES * limits.MAX_METADATA_BYTES  # real 4 KiB metadata on every hit


def test_search_batch_of_64_at_k_1000_is_refused_up_front_and_what_fits_is_answered(shard):
    running, _ = shard

    async def scenario(stub):
        big = retrieval_pb2.SearchBatchRequest(queries=[_vector_query(i, 1000) for i in range(64)])
        try:
            await stub.SearchBatch(big, timeout=60)
            raise AssertionError("a 64 x k=1000 batch over 4 KiB metadata was answered")
        except grpc.aio.AioRpcError as exc:
            refused = (exc.code(), exc.details())
        # the largest batch the limit allows at k=1000, and with diffusion (vectors in the shard answers)
        n = int(refused[1].rsplit("at most ", 1)[1].split(" ")[0])
        fits = retrieval_pb2.SearchBatchRequest(queries=[_vector_query(i, 1000) for i in range(n)])
        plain = await stub.SearchBatch(fits, timeout=120)
        for q in fits.queries:  # depth 2000 with vectors: twice what one shard call may carry, so the
            q.rerank.diffuse.neighbourhood = 2000  # broker splits the fan-out (the shard refuses an unsplit one)
        diffused = await stub.SearchBatch(fits, timeout=120)
        return refused, n, plain, diffused

    (code, details), n, plain, diffused = _with_broker(running, scenario)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("queries: 64 queries") and "64 MiB message limit" in details and "queries of k=1000 per SearchBatch" in details
    assert n >= 10
    for resp in (plain, diffused):
        assert [r.status.code for r in resp.results] == [0] * n, [r.status.message for r in resp.results if r.status.code]
        assert all(len(r.response.results) == N_IMAGES and not r.response.partial for r in resp.results)
        assert all(len(x.metadata["blob"]) > 4000 for r in resp.results for x in r.response.results)


def test_records_stored_above_todays_limits_do_not_poison_answers_and_are_counted(shard):
    running, servicer = shard
    rng = np.random.default_rng(5)
    old = [StoredImage(f"old{i}", _unit(rng, 1)[0], None, None, {"blob": "y" * (25 * MiB)}) for i in range(3)]
    kp = np.zeros((limits.MAX_LOCAL_FEATURES_PER_IMAGE + 1, 4), np.float32)
    many_regions = StoredImage("old3", _unit(rng, 1)[0], _unit(rng, limits.MAX_REGIONS_PER_IMAGE + 8).astype(np.float16),
                               LocalStore.quantize(kp, np.ones((len(kp), 8), np.float32) / np.sqrt(8)), {"name": "old3"})
    servicer.index.add(old + [many_regions])  # the index API: no servicer checks, as before the limits existed
    query = old[0].vector

    async def scenario(stub):
        search = await stub.Search(retrieval_pb2.SearchRequest(vector=to_tensor(query), k=1000), timeout=60)
        pages, cursor = [], ""
        while True:
            page = await stub.ListImages(retrieval_pb2.ListImagesRequest(page_size=1000, cursor=cursor), timeout=60)
            pages.append(page)
            if not page.next_cursor:
                break
            cursor = page.next_cursor
        got = await stub.GetImages(retrieval_pb2.GetImagesRequest(ids=["old0", "old3", "img0001"]), timeout=60)
        stats = await stub.GetStats(retrieval_pb2.GetStatsRequest(), timeout=60)
        return search, pages, got, stats

    search, pages, got, stats = _with_broker(running, scenario)
    assert not search.partial and len(search.results) == N_IMAGES + 4
    assert search.results[0].id == "old0" and dict(search.results[0].metadata) == {}  # metadata withheld
    assert dict(next(r for r in search.results if r.id == "img0001").metadata) == _full_metadata(1)
    listed = [img for p in pages for img in p.images]
    assert len(listed) == N_IMAGES + 4 and {img.id for img in listed if not img.metadata} == {"old0", "old1", "old2"}
    assert [dict(i.metadata) for i in got.images] == [{}, {"name": "old3"}, _full_metadata(1)]
    assert stats.shards[0].oversized_records == 4
    # GetFeatures leaves the parts above the limits out, keeps the rest
    ch, stub = _shard_stub(running)
    with ch:
        feats = stub.GetFeatures(shard_pb2.GetFeaturesRequest(shard_id=0, ids=["old3", "old0"], want_global=True, want_regional=True,
                                                              want_local=True), metadata=AUTH, timeout=30)
        # ids beyond what fits the message limit at the feature limits are refused up front
        with pytest.raises(grpc.RpcError) as err:
            stub.GetFeatures(shard_pb2.GetFeaturesRequest(shard_id=0, ids=[f"img{i:04d}" for i in range(N_IMAGES)], want_local=True),
                             metadata=AUTH, timeout=30)
    assert list(feats.ids) == ["old3", "old0"]
    f = feats.features[0]
    assert f.__getattribute__("global").shape == [DIM] and not f.regional.shape and not f.local.keypoints.shape
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("ids: ")
    # deleting an old record lowers the count
    servicer.index.delete(["old1"])
    assert servicer.index.stats()["oversized"] == 3
