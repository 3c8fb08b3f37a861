"""Verification on the shards (``Shard.Verify``) against a real shard server: the same inliers,
models and matches as the broker's own verification of the same candidates, and shard-side
validation of the query features like any other shard input."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from loupe.tensors import to_tensor
from loupe.v1 import shard_pb2, shard_pb2_grpc, types_pb2
from services.broker.backends import GrpcShardClient
from services.broker.config import BrokerConfig
from services.broker.deadlines import Deadline
from services.broker.metrics import BrokerMetrics
from services.broker.search_pipeline import SearchPipeline
from services.broker.topk import Hit
from services.common.auth import AuthPolicy, bearer_metadata
from services.common.grpc_server import ServerOptions
from services.common.local_candidates import (
    candidate_locals,
    params_to_proto,
    query_local_to_proto,
    result_from_proto,
    verify_local,
)
from services.index.servicer import create_server as create_shard
from services.index.store import LocalStore, StoredImage
from services.rerank.verify import VerifyParams

TOKEN = "internal-test-token"
PARAMS = VerifyParams(min_inliers=16)
N_POINTS, DIM = 600, 40


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _scene(seed: int = 0):
    """A query and 12 candidates: 6 views of the query's scene (affine, noisy, partly covered),
    6 unrelated images. Returns (query (kp, desc), {id: StoredImage})."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, 1000, size=(N_POINTS, 2))
    desc = _unit(rng.normal(size=(N_POINTS, DIM)))
    q_kp = np.concatenate([pts, rng.uniform(1, 4, (N_POINTS, 1)), rng.uniform(0, 1, (N_POINTS, 1))], axis=1).astype(np.float32)
    images = {}
    for i in range(12):
        if i < 6:
            keep = rng.random(N_POINTS) < 0.25 + 0.1 * i
            a = np.array([[0.8 + 0.05 * i, 0.1, 30.0 * i], [-0.05, 0.9, 12.0]])
            c_pts = pts[keep] @ a[:, :2].T + a[:, 2] + rng.normal(0, 2.0, (keep.sum(), 2))
            c_desc = _unit(desc[keep] + 0.25 * rng.normal(size=(keep.sum(), DIM)))
            n_noise = 300
            c_pts = np.concatenate([c_pts, rng.uniform(0, 1000, (n_noise, 2))])
            c_desc = np.concatenate([c_desc, _unit(rng.normal(size=(n_noise, DIM)))])
        else:
            c_pts = rng.uniform(0, 1000, (500, 2))
            c_desc = _unit(rng.normal(size=(500, DIM)))
        kp = np.concatenate([c_pts, np.ones((len(c_pts), 2))], axis=1).astype(np.float32)
        vec = _unit(rng.normal(size=(1, 16)))[0]
        images[f"img{i:02d}"] = StoredImage(f"img{i:02d}", vec, None, LocalStore.quantize(kp, c_desc), {}, 1000 + 24 * i, 750)
    images["noloc"] = StoredImage("noloc", _unit(rng.normal(size=(1, 16)))[0], None, None, {}, 640, 480)
    return (q_kp, desc), images


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    opts = ServerOptions(host="127.0.0.1", port=0, auth=AuthPolicy.internal(TOKEN))
    running, servicer = create_shard(0, opts, data_dir=str(tmp_path_factory.mktemp("shard") / "shard-000"))
    query, images = _scene()
    servicer.index.add(list(images.values()))
    yield running, query, sorted(images)
    running.stop(0)
    servicer.index.close()


def _stub(running):
    ch = grpc.insecure_channel(f"127.0.0.1:{running.port}", options=ServerOptions().channel_options())
    return ch, shard_pb2_grpc.ShardStub(ch)


META = bearer_metadata(TOKEN)


def test_shard_verification_equals_the_broker_s_on_the_same_features(shard):
    running, query, ids = shard
    ch, stub = _stub(running)
    with ch:
        # the broker's way: read the candidates' features, verify here
        feats = stub.GetFeatures(shard_pb2.GetFeaturesRequest(shard_id=0, ids=ids, want_local=True), metadata=META)
        local = candidate_locals(dict(zip(feats.ids, feats.features)))
        here = {}
        for image_id, c in local.items():
            res = verify_local(query, c, PARAMS)
            here[image_id] = (res, c.keypoints[res.inlier_pairs[:, 1], :2])
        # the shard's way
        resp = stub.Verify(shard_pb2.ShardVerifyRequest(shard_id=0, query=query_local_to_proto(query), ids=ids,
                                                        params=params_to_proto(PARAMS), timeout_s=30), metadata=META, timeout=30)
    there = {r.id: result_from_proto(r) for r in resp.results}
    assert list(there) == [i for i in ids if i != "noloc"] == list(here) and not resp.unverified
    verified = [i for i, (r, _) in there.items() if r.inliers >= PARAMS.min_inliers]
    assert len(verified) >= 4 and len(verified) < len(there)  # the data has both outcomes
    for image_id, (res, pts) in here.items():
        got, got_pts = there[image_id]
        assert got.inliers == res.inliers, image_id
        np.testing.assert_array_equal(got.inlier_pairs, res.inlier_pairs)
        np.testing.assert_array_equal(got_pts, pts)
        if res.model is None:
            assert got.model is None
        else:
            np.testing.assert_array_equal(got.model, res.model)
    assert resp.seconds >= resp.verify_seconds > 0


def test_pipeline_ranks_the_same_whether_shards_or_broker_verify(shard):
    running, query, ids = shard

    async def ranked(where: str):
        client = GrpcShardClient(0, f"127.0.0.1:{running.port}", ServerOptions().channel_options(), internal_token=TOKEN)
        pool = ThreadPoolExecutor(2)
        try:
            pipe = SearchPipeline(None, [client], None, BrokerMetrics.create(), BrokerConfig(verify_on=where), pool)
            hits = [Hit(1.0 - k / 100, image_id, 0) for k, image_id in enumerate(ids)]
            return await pipe.verify(query, hits, PARAMS, Deadline(30.0, 30.0))
        finally:
            await client.close()
            pool.shutdown()

    on_shards, on_broker = asyncio.run(ranked("shards")), asyncio.run(ranked("broker"))
    assert [v.hit.image_id for v in on_shards] == [v.hit.image_id for v in on_broker]
    assert [(v.score, v.verified) for v in on_shards] == [(v.score, v.verified) for v in on_broker]
    for a, b in zip(on_shards, on_broker):
        assert (a.result is None) == (b.result is None)
        if a.result is not None:
            np.testing.assert_array_equal(a.result.inlier_pairs, b.result.inlier_pairs)
            np.testing.assert_array_equal(a.inlier_points, b.inlier_points)
    assert on_shards[-1].result is None and on_shards[-1].hit.image_id == "noloc"  # no local features: not verified
    assert on_shards[0].verified


def _bad(stub, field: str, **changes) -> None:
    running_query = changes.pop("query")
    req = shard_pb2.ShardVerifyRequest(shard_id=0, query=running_query, ids=["img00"], params=params_to_proto(PARAMS), timeout_s=5)
    for name, value in changes.items():
        if name == "params":
            req.params.CopyFrom(value)
        elif name == "ids":
            del req.ids[:]
            req.ids.extend(value)
        else:
            setattr(req, name, value)
    with pytest.raises(grpc.RpcError) as err:
        stub.Verify(req, metadata=META, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(field), err.value.details()


def test_shard_validates_the_verify_request_naming_the_field(shard):
    running, query, _ = shard
    good = query_local_to_proto(query)
    ch, stub = _stub(running)
    with ch:
        _bad(stub, "query", query=types_pb2.LocalFeatures(keypoints=to_tensor(np.zeros((3, 2), np.float32)),
                                                          descriptors=to_tensor(np.zeros((3, DIM), np.float32))))
        _bad(stub, "query.keypoints", query=types_pb2.LocalFeatures(keypoints=to_tensor(np.zeros((3000, 4), np.float32)),
                                                                    descriptors=to_tensor(np.zeros((3000, DIM), np.float32))))
        nan = query[1].copy()
        nan[0, 0] = np.nan
        _bad(stub, "query", query=query_local_to_proto((query[0], nan)))
        _bad(stub, "query.descriptors", query=query_local_to_proto((query[0], _unit(np.ones((len(query[0]), 32))))))
        _bad(stub, "params", query=good, params=shard_pb2.ShardVerifyParams(matcher="mnn", model="affine"))
        _bad(stub, "ids", query=good, ids=[f"x{i}" for i in range(3000)])
        _bad(stub, "ids[0]", query=good, ids=[""])
        _bad(stub, "shard_id", query=good, shard_id=3)
        # internal: the cluster token is required like on every shard rpc
        with pytest.raises(grpc.RpcError) as err:
            stub.Verify(shard_pb2.ShardVerifyRequest(shard_id=0, query=good, ids=["img00"], params=params_to_proto(PARAMS)), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_verify_request_without_keypoints_leaves_every_candidate_unverified(shard):
    running, _, ids = shard
    empty = query_local_to_proto((np.zeros((0, 4), np.float32), np.zeros((0, DIM), np.float32)))
    ch, stub = _stub(running)
    with ch:
        resp = stub.Verify(shard_pb2.ShardVerifyRequest(shard_id=0, query=empty, ids=ids, params=params_to_proto(PARAMS), timeout_s=10),
                           metadata=META, timeout=10)
    assert len(resp.results) == len(ids) - 1 and all(r.inliers == 0 and not r.model for r in resp.results)

