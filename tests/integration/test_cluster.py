"""End to end on real parts: local Ray actors, gRPC on 127.0.0.1, faiss, Prometheus scrape."""

from __future__ import annotations

import os
import secrets
import stat
import struct
import time
import urllib.request
import zlib

import grpc
import numpy as np
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.config import ClusterConfig
from cluster.demo import HELD_OUT, INDEXED, PHOTOS, encode_jpeg, load_photo
from cluster.launcher import Cluster
from loupe.client import ImageToAdd, RetrievalClient
from loupe.tensors import from_tensor
from loupe.v1 import extractor_pb2, extractor_pb2_grpc, shard_pb2, shard_pb2_grpc
from shard_records import shard_record

pytestmark = pytest.mark.usefixtures("local_ray")  # one Ray for the whole run (tests/conftest.py)

PHOTO_SUBSET = PHOTOS[:6]
INTERNAL_TOKEN = secrets.token_urlsafe(32)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # the internal token is always on: this test reads it from its own file to call an extractor directly
    (token_file := tmp_path_factory.mktemp("internal") / "token").write_text(INTERNAL_TOKEN)
    cfg = ClusterConfig(shards=2, replicas=1, max_side=320, global_max_side=320, scales=(1.0,), data_dir=str(tmp_path_factory.mktemp("data")),
                        internal_token_file=str(token_file))
    with Cluster(cfg) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    with RetrievalClient(cluster.broker_address) as c:
        c.wait_ready(30)
        db = [ImageToAdd(f"{p}/{t}", encode_jpeg(fn(load_photo(p))), {"photo": p}) for p in PHOTO_SUBSET for t, fn in INDEXED.items()]
        assert c.add_images(db, batch_size=5).added == len(db)
        yield c


def query(photo: str, transform: str = "perspective") -> bytes:
    return encode_jpeg(HELD_OUT[transform](load_photo(photo)))


def test_search_by_image_finds_the_same_photo(client):
    for photo in PHOTO_SUBSET:
        resp = client.search(image=query(photo), k=4)
        assert not resp.partial
        top = [r.id.split("/")[0] for r in resp.results]
        assert top[0] == photo, (photo, [(r.id, r.score) for r in resp.results])
        assert resp.results[0].metadata["photo"] == photo
        scores = [r.score for r in resp.results]
        assert scores == sorted(scores, reverse=True)
        assert {t.stage for t in resp.timings} >= {"extract", "fanout", "merge", "total"}


def test_offset_pages_through_the_same_ranking(client):
    full = [r.id for r in client.search(image=query("coffee"), k=10).results]
    page = [r.id for r in client.search(image=query("coffee"), k=4, offset=3).results]
    assert page == full[3:7]


def test_search_by_vector_matches_search_by_image(cluster, client):
    address = ray.get(cluster.extractor_actors[0].address.remote())
    with grpc.insecure_channel(address) as ch:
        feats = extractor_pb2_grpc.ExtractorStub(ch).Extract(extractor_pb2.ExtractRequest(image=query("chelsea")), timeout=60,
                                                             metadata=(("authorization", f"Bearer {INTERNAL_TOKEN}"),)).features
    vec = from_tensor(getattr(feats, "global"))
    by_vec = [r.id for r in client.search(vector=vec, k=5).results]
    by_img = [r.id for r in client.search(image=query("chelsea"), k=5).results]
    assert by_vec == by_img and by_vec[0].startswith("chelsea/")


def test_stats_count_every_image_on_its_shard(client):
    s = client.stats()
    assert s.images == len(PHOTO_SUBSET) * len(INDEXED)
    assert len(s.shards) == 2 and all(x.healthy for x in s.shards)
    assert all(x.images > 0 for x in s.shards)
    assert all(x.store_bytes > 0 and x.index_bytes > 0 and x.index == "Flat" for x in s.shards)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "kwargs, code, field",
    [
        ({"image": b"not an image at all"}, grpc.StatusCode.INVALID_ARGUMENT, "image:"),
        ({"image": _png_header(100_000, 100_000)}, grpc.StatusCode.RESOURCE_EXHAUSTED, "pixels"),
        ({"vector": np.ones(7, np.float32)}, grpc.StatusCode.INVALID_ARGUMENT, "query"),
        ({"vector": np.zeros(8, np.float32)}, grpc.StatusCode.INVALID_ARGUMENT, "vector"),
        ({"image": b"x", "k": 0}, grpc.StatusCode.INVALID_ARGUMENT, "k:"),
        ({"image": b"x", "k": 10**7}, grpc.StatusCode.INVALID_ARGUMENT, "k:"),
        ({"image": b"x", "offset": -1}, grpc.StatusCode.INVALID_ARGUMENT, "offset"),
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "query"),
    ],
)
def test_bad_search_input_gets_a_clear_status(client, kwargs, code, field):
    kwargs.setdefault("k", 5)
    with pytest.raises(grpc.RpcError) as err:
        client.search(**kwargs)
    assert err.value.code() == code, err.value.details()
    assert field in err.value.details()
    assert "Traceback" not in err.value.details() and "DOS attack" not in err.value.details()  # no library text (Pillow's bomb guard)
    assert client.search(image=query("coffee"), k=1).results  # still serving


def test_bad_writes_and_deletes(client):
    with pytest.raises(grpc.RpcError) as err:
        client.add_images([ImageToAdd("ok", query("coffee")), ImageToAdd("broken", b"\xff\xd8garbage")])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "broken" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.add_images([ImageToAdd("", query("coffee"))])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "id" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.delete(["no-such-image"])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "ids" in err.value.details()


def test_delete_removes_from_results(client):
    client.add_images([ImageToAdd("temp/astronaut", query("astronaut", "brightness"))])
    assert client.search(image=query("astronaut", "brightness"), k=1).results[0].id == "temp/astronaut"
    assert list(client.delete(["temp/astronaut", "nope"]).deleted) == ["temp/astronaut"]
    assert all(r.id != "temp/astronaut" for r in client.search(image=query("astronaut", "brightness"), k=10).results)


def test_health_and_reflection_are_served(cluster, client):
    with grpc.insecure_channel(cluster.broker_address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="loupe.v1.Retrieval"), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in resp.list_services_response.service}
        assert "loupe.v1.Retrieval" in names


DASHBOARD_METRICS = (
    'loupe_requests_total{grpc_code="OK",grpc_method="Search"}',
    'loupe_requests_total{grpc_code="INVALID_ARGUMENT",grpc_method="Search"}',
    'loupe_stage_duration_seconds_bucket{le="0.005",stage="fanout"}',
    'loupe_stage_duration_seconds_count{stage="extract"}',
    'loupe_stage_duration_seconds_count{stage="merge"}',
    'loupe_stage_duration_seconds_count{stage="total"}',
    'loupe_request_duration_seconds_count{grpc_method="Search"}',
    'loupe_inflight_requests{grpc_method="Search"}',
    'loupe_shard_vectors{shard="0"}',
    'loupe_shard_store_bytes{shard="1"}',
    "loupe_images_added_total",
)


def test_metrics_are_scraped_over_http(cluster, client):
    client.search(image=query("rocket"), k=3)
    client.stats()  # refreshes per-shard gauges
    body = urllib.request.urlopen(f"http://{cluster.metrics_address}/metrics", timeout=10).read().decode()
    for name in DASHBOARD_METRICS:
        assert name in body, name


# --- rerank stages through the cluster (run before the shard-failure tests below) ----------
from loupe.rerank_spec import parse_rerank  # noqa: E402



def test_verification_reranks_and_explains(client):
    opts = parse_rerank("verify")
    resp = client.search(image=query("rocket", "occlusion"), k=5, rerank=opts, return_matches=True)
    top = resp.results[0]
    assert top.id.startswith("rocket/") and top.verified and top.stages.inliers >= 10
    assert top.confidence > 0.5 and resp.query_confidence > 0.5
    qp = from_tensor(top.matches.query_points)
    rp = from_tensor(top.matches.result_points)
    assert qp.shape == rp.shape == (top.stages.inliers, 2)
    assert "verify" in {t.stage for t in resp.timings}
    # verified results outrank unverified ones, and scores stay sorted
    flags = [r.verified for r in resp.results]
    assert flags == sorted(flags, reverse=True)
    assert [r.score for r in resp.results] == sorted((r.score for r in resp.results), reverse=True)


def test_unrelated_query_has_low_confidence(client):
    resp = client.search(image=encode_jpeg(load_photo("gravel")), k=5, rerank=parse_rerank("verify"))
    assert resp.query_confidence < 0.5
    assert not any(r.confidence > 0.5 for r in resp.results)


@pytest.mark.parametrize("spec", ["qe", "dba", "diffuse", "diffuse-regional", "verify,diffuse", "verify,diffuse-first", "qe,verify,diffuse",
                                  "verify,diffuse-regional,diffuse-first,verify-global", "verify,diffuse-regional,diffuse-first,reseed",
                                  "verify,qe-verified", "verify,diffuse-regional,diffuse-first,verify-global,reseed,qe-verified",
                                  "regional-match", "regional-match,verify,diffuse-regional,diffuse-first,verify-global", "qe,regional-match"])
def test_every_rerank_configuration_runs_end_to_end(client, spec):
    resp = client.search(image=query("coffee"), k=5, rerank=parse_rerank(spec))
    assert len(resp.results) == 5
    assert resp.results[0].id.startswith("coffee/"), [(r.id, r.score) for r in resp.results]
    assert [r.score for r in resp.results] == sorted((r.score for r in resp.results), reverse=True)


def test_regional_match_scores_global_plus_the_best_region(cluster, client):
    """Each result scores its global similarity plus the best similarity of the query's global
    vector to one of its stored regional vectors (read here from the shards, as the broker does
    before a graph build gives it its regional copy)."""
    auth = (("authorization", f"Bearer {INTERNAL_TOKEN}"),)
    with grpc.insecure_channel(ray.get(cluster.extractor_actors[0].address.remote())) as ch:
        feats = extractor_pb2_grpc.ExtractorStub(ch).Extract(extractor_pb2.ExtractRequest(image=query("coffee")), timeout=60, metadata=auth).features
    q = from_tensor(getattr(feats, "global"))
    q = q / np.linalg.norm(q)
    n = client.stats().images
    resp = client.search(image=query("coffee"), k=n, rerank=parse_rerank("regional-match"))
    plain = {r.id: r.score for r in client.search(image=query("coffee"), k=n).results}
    assert len(resp.results) == n and [r.score for r in resp.results] == sorted((r.score for r in resp.results), reverse=True)
    for shard_id in {r.shard_id for r in resp.results}:
        ids = [r.id for r in resp.results if r.shard_id == shard_id]
        with grpc.insecure_channel(ray.get(cluster.shard_actors[shard_id].address.remote())) as ch:
            got = shard_pb2_grpc.ShardStub(ch).GetFeatures(shard_pb2.GetFeaturesRequest(shard_id=shard_id, ids=ids, want_regional=True),
                                                          timeout=30, metadata=auth)
        best = {i: float(np.max(from_tensor(f.regional).astype(np.float32) @ q)) for i, f in zip(got.ids, got.features)}
        for r in resp.results:
            if r.shard_id == shard_id:
                assert getattr(r.stages, "global") == pytest.approx(plain[r.id], abs=1e-5)  # the reported global score stays the plain one
                assert r.score == pytest.approx(plain[r.id] + best[r.id], abs=1e-3), r.id
    assert resp.results[0].id.startswith("coffee/")


def test_bad_rerank_options_are_rejected(client):
    opts = parse_rerank("diffuse")
    opts.diffuse.alpha = 1.5
    with pytest.raises(grpc.RpcError) as err:
        client.search(image=query("coffee"), k=5, rerank=opts)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rerank.diffuse" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.search(vector=np.ones(1280, np.float32), k=5, rerank=parse_rerank("verify"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rerank.verify" in err.value.details()
    for spec, field in (("verify,diffuse,reseed", "rerank.reseed_after_verify"), ("verify,verify-global", "rerank.verify_global_too"),
                        ("diffuse,qe-verified", "rerank.expand_verified")):
        with pytest.raises(grpc.RpcError) as err:
            client.search(image=query("coffee"), k=5, rerank=parse_rerank(spec))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details(), spec


def test_collection_graph_serves_global_diffusion(client):
    n = client.stats().images
    with pytest.raises(grpc.RpcError) as err:
        client.build_graph(k=100_000)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "k" in err.value.details()
    built = client.build_graph(k=10)
    assert built.images == n and built.k == 10 and built.regions == 5 * n  # 5 k-means centroids per image
    assert built.bytes == (n + built.regions) * 10 * 6
    stats = client.stats()
    assert stats.graph_images == n and stats.graph_regions == 5 * n
    # the neighbourhood holds the whole collection: the graph's subgraph is the per-query graph
    offline, online = parse_rerank("diffuse"), parse_rerank("diffuse-online")
    offline.diffuse.k = online.diffuse.k = 10
    a = client.search(image=query("coffee"), k=n, rerank=offline)
    b = client.search(image=query("coffee"), k=n, rerank=online)
    assert [r.id for r in a.results][:5] == [r.id for r in b.results][:5]
    np.testing.assert_allclose([r.score for r in a.results], [r.score for r in b.results], atol=1e-2)
    # regional: likewise, the regional graph's subgraph is the per-query regional graph
    offline_r, online_r = parse_rerank("diffuse-regional"), parse_rerank("diffuse-regional,diffuse-online")
    offline_r.diffuse.k = online_r.diffuse.k = 10
    a = client.search(image=query("coffee"), k=n, rerank=offline_r)
    b = client.search(image=query("coffee"), k=n, rerank=online_r)
    assert a.results[0].id.startswith("coffee/")
    assert [r.id for r in a.results][:5] == [r.id for r in b.results][:5]
    np.testing.assert_allclose([r.score for r in a.results], [r.score for r in b.results], atol=1e-2)
    # a replaced image leaves the graph and is joined online
    replaced = f"{PHOTO_SUBSET[0]}/{next(iter(INDEXED))}"
    assert client.add_images([ImageToAdd(replaced, encode_jpeg(load_photo(PHOTO_SUBSET[0])), {"photo": PHOTO_SUBSET[0]})]).added == 1
    stats = client.stats()
    assert stats.graph_images == n - 1 and stats.graph_regions == 5 * (n - 1)
    assert client.search(image=query("coffee"), k=5, rerank=offline).results[0].id.startswith("coffee/")
    assert client.search(image=query("coffee"), k=5, rerank=offline_r).results[0].id.startswith("coffee/")
    assert client.build_graph(remove=True).images == 0 and client.stats().graph_images == 0


def test_whitening_fit_and_remove(client):
    before = [r.id for r in client.search(image=query("chelsea"), k=3).results]
    fit = client.fit_whitening()
    assert fit.sample_size == len(PHOTO_SUBSET) * len(INDEXED) and fit.dim > 0
    assert client.stats().whitened
    after = client.search(image=query("chelsea"), k=3, rerank=parse_rerank("diffuse"))
    assert after.results[0].id.startswith("chelsea/")
    client.fit_whitening(remove=True)
    assert not client.stats().whitened
    assert [r.id for r in client.search(image=query("chelsea"), k=3).results] == before


def test_learned_whitening_from_verified_pairs(client):
    """`loupe whiten verified`: pairs found by verification on the collection itself, fitted and installed by the broker."""
    from cluster.whitening import verified_pairs, whiten

    pairs = verified_pairs(client, candidates=4)
    assert pairs and all(a.split("/")[0] == b.split("/")[0] and n >= 16 for a, b, n in pairs)  # two views of one photo
    fit = whiten(client, "verified", dim=8, candidates=4)
    assert fit.pairs == len(pairs) and fit.dim == 8 and fit.sample_size == len(PHOTO_SUBSET) * len(INDEXED)
    assert client.stats().whitened
    assert client.search(image=query("chelsea"), k=3).results[0].id.startswith("chelsea/")
    for bad, code, field in (([("chelsea/x", "chelsea/x")], grpc.StatusCode.INVALID_ARGUMENT, "pairs[0]"),
                             ([(pairs[0][0], "a\x01")], grpc.StatusCode.INVALID_ARGUMENT, "pairs[0].b"),
                             ([(pairs[0][0], "no-such-image")], grpc.StatusCode.NOT_FOUND, "pairs")):
        with pytest.raises(grpc.RpcError) as err:
            client.fit_whitening(pairs=bad)
        assert err.value.code() == code and err.value.details().startswith(field), err.value.details()
    assert client.stats().whitened  # a refused request leaves the installed whitening alone
    client.fit_whitening(remove=True)
    assert not client.stats().whitened


# --- shard failures: these change the cluster, so they run last ---------------------------
def test_restarted_shard_reloads_its_store(cluster, client):
    before = client.stats().images
    cluster.restart_shard(0)
    deadline = time.monotonic() + 30  # the broker's channel reconnects with gRPC's backoff
    after = client.stats()
    while not all(s.healthy for s in after.shards) and time.monotonic() < deadline:
        time.sleep(0.5)
        after = client.stats()
    assert after.images == before and all(s.healthy for s in after.shards)
    assert client.search(image=query("coffee"), k=1).results[0].id.startswith("coffee/")


def test_killed_shard_gives_partial_results(cluster, client):
    cluster.kill_shard(1)
    resp = client.search(image=query("coffee"), k=5, timeout_s=20)
    assert resp.partial and list(resp.missing_shards) == [1]
    assert resp.results and all(r.shard_id == 0 for r in resp.results)
    body = urllib.request.urlopen(f"http://{cluster.metrics_address}/metrics", timeout=10).read().decode()
    assert 'loupe_shard_failures_total{reason="UNAVAILABLE",shard="1"}' in body


def test_internal_ports_refuse_callers_without_the_internal_token(cluster, client):
    """Even without public tokens, nothing but the broker may write or wipe a shard: the
    cluster-internal token is always on (generated per cluster when no file is given)."""
    address = ray.get(cluster.shard_actors[0].address.remote())
    request = shard_pb2.ShardDeleteRequest(ids=["coffee/orig"])
    with grpc.insecure_channel(address) as ch:
        for metadata in ((), (("authorization", "Bearer not-the-token"),)):
            with pytest.raises(grpc.RpcError) as err:
                shard_pb2_grpc.ShardStub(ch).Delete(request, timeout=10, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
        stats = shard_pb2_grpc.ShardStub(ch).Stats(shard_pb2.ShardStatsRequest(shard_id=0), timeout=10,
                                                  metadata=(("authorization", f"Bearer {INTERNAL_TOKEN}"),))
    assert stats.images > 0  # nothing was deleted


def test_a_shard_refuses_a_record_of_another_dimension_from_the_token_holder(cluster, client):
    """The shard checks what even the internal-token holder writes: a vector of the wrong dimension
    is INVALID_ARGUMENT naming the field, and the shard's count is unchanged."""
    address = ray.get(cluster.shard_actors[0].address.remote())
    md = (("authorization", f"Bearer {INTERNAL_TOKEN}"),)
    with grpc.insecure_channel(address) as ch:
        stub = shard_pb2_grpc.ShardStub(ch)
        before = stub.Stats(shard_pb2.ShardStatsRequest(shard_id=0), timeout=10, metadata=md).images
        req = shard_pb2.ShardAddRequest(shard_id=0, records=[shard_record("odd/0", np.ones(2, np.float32))])
        with pytest.raises(grpc.RpcError) as err:
            stub.Add(req, timeout=10, metadata=md)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "dimension" in err.value.details()
        assert stub.Stats(shard_pb2.ShardStatsRequest(shard_id=0), timeout=10, metadata=md).images == before


def test_ray_token_is_private_to_this_process_owner():
    """A local Ray gets its token from a 0600 file in a 0700 directory, not a world-readable
    ~/.ray/auth_token."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "")
    assert path and os.path.isfile(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
