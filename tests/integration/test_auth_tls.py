"""Token auth and TLS on a real cluster (Ray actors, gRPC on 127.0.0.1, a throwaway CA).

What is checked: an unauthenticated caller gets health only; a read token searches but cannot
write; a write token can; the internal shard/extractor services refuse everything but the
cluster-internal token; TLS with the CA works, plaintext to the TLS port fails.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from secure_setup import make_pki, make_tokens

from cluster.config import ClusterConfig
from cluster.demo import INDEXED, PHOTOS, encode_jpeg, load_photo
from cluster.launcher import Cluster
from loupe.client import ImageToAdd, RetrievalClient, search_request
from loupe.tensors import to_tensor
from loupe.v1 import extractor_pb2, extractor_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc, shard_pb2, shard_pb2_grpc
from services.common.auth import PERMISSION_DENIED_DETAIL, UNAUTHENTICATED_DETAIL

pytestmark = pytest.mark.usefixtures("local_ray")  # one Ray for the whole run (tests/conftest.py)

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("secrets")
    return make_pki(d / "tls"), make_tokens(d / "auth")


@pytest.fixture(scope="module")
def cluster(secrets_dir):
    pki, tokens = secrets_dir
    cfg = ClusterConfig(
        shards=2, replicas=1, max_side=160, global_max_side=160, scales=(1.0,), namespace="loupe-auth-test",
        tls_cert_file=str(pki.cert), tls_key_file=str(pki.key),
        auth_tokens_file=str(tokens.tokens_file), internal_token_file=str(tokens.internal_file),
    )
    with Cluster(cfg) as c:
        yield c


def _client(cluster, secrets_dir, token: str | None) -> RetrievalClient:
    pki, _ = secrets_dir
    return RetrievalClient(cluster.broker_address, token=token, tls_ca_file=str(pki.ca))


@pytest.fixture(scope="module")
def writer(cluster, secrets_dir):
    _, tokens = secrets_dir
    with _client(cluster, secrets_dir, tokens.write) as c:
        c.wait_ready(30)
        db = [ImageToAdd(f"{p}/{t}", encode_jpeg(fn(load_photo(p))), {"photo": p}) for p in PHOTOS[:3] for t, fn in list(INDEXED.items())[:2]]
        assert c.add_images(db, batch_size=3).added == len(db)
        yield c


@pytest.fixture(scope="module")
def anonymous(cluster, secrets_dir):
    with _client(cluster, secrets_dir, None) as c:
        yield c


@pytest.fixture(scope="module")
def reader(cluster, secrets_dir):
    _, tokens = secrets_dir
    with _client(cluster, secrets_dir, tokens.read) as c:
        yield c


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def _query() -> bytes:
    return encode_jpeg(load_photo(PHOTOS[0]))


def _public_calls(client: RetrievalClient) -> dict:
    return {
        "Search": lambda: client.search(image=_query(), k=3),
        "GetStats": lambda: client.stats(),
        "AddImages": lambda: client.add_images([ImageToAdd("x", _query())]),
        "Delete": lambda: client.delete(["x"]),
        "FitWhitening": lambda: client.fit_whitening(),
        "BuildGraph": lambda: client.build_graph(),
        "GetImages": lambda: client.get_images(["x"]),
        "ListImages": lambda: client.list_images(),
        "SearchBatch": lambda: client.search_batch([search_request(image_id="x", k=1)]),
    }


def _reflection_list(channel: grpc.Channel, metadata=()) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata, timeout=10)
    return [s.name for s in next(responses).list_services_response.service]


def _tls_channel(address: str, ca) -> grpc.Channel:
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca.read_bytes()))


def test_unauthenticated_caller_gets_health_only(cluster, secrets_dir, writer, anonymous):
    pki, _ = secrets_dir
    with _tls_channel(cluster.broker_address, pki.ca) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="loupe.v1.Retrieval"), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert _code(lambda: _reflection_list(ch)) == (UNAUTH, UNAUTHENTICATED_DETAIL)
    for name, call in _public_calls(anonymous).items():
        assert _code(call) == (UNAUTH, UNAUTHENTICATED_DETAIL), name
    assert writer.stats().images == 6  # nothing was written or deleted by the anonymous calls


def test_unknown_token_is_told_the_same_as_no_token(cluster, secrets_dir, writer):
    with _client(cluster, secrets_dir, "not-a-token") as c:
        assert _code(lambda: c.search(image=_query(), k=3)) == (UNAUTH, UNAUTHENTICATED_DETAIL)
        assert _code(lambda: c.delete(["x"])) == (UNAUTH, UNAUTHENTICATED_DETAIL)
    _, tokens = secrets_dir
    with _client(cluster, secrets_dir, tokens.write + "x") as c:  # a near miss is just unknown
        assert _code(lambda: c.stats()) == (UNAUTH, UNAUTHENTICATED_DETAIL)
    with _client(cluster, secrets_dir, tokens.internal) as c:  # the internal token is no public token
        assert _code(lambda: c.stats()) == (UNAUTH, UNAUTHENTICATED_DETAIL)


def test_read_token_searches_but_cannot_write(cluster, secrets_dir, writer, reader):
    resp = reader.search(image=_query(), k=3)
    assert resp.results and resp.results[0].id.startswith(PHOTOS[0])
    assert reader.stats().images == 6
    calls = _public_calls(reader)
    for name in ("AddImages", "Delete", "FitWhitening", "BuildGraph"):
        assert _code(calls[name]) == (DENIED, PERMISSION_DENIED_DETAIL), name
    for name in ("GetImages", "ListImages", "SearchBatch"):  # read role (issue 13)
        calls[name]()
    assert writer.stats().images == 6
    pki, tokens = secrets_dir
    with _tls_channel(cluster.broker_address, pki.ca) as ch:
        names = _reflection_list(ch, metadata=(("authorization", f"Bearer {tokens.read}"),))
    assert "loupe.v1.Retrieval" in names


def test_write_token_adds_searches_and_deletes(writer):
    add = writer.add_images([ImageToAdd("extra/one", encode_jpeg(load_photo(PHOTOS[3])))])
    assert add.added == 1
    assert writer.search(image=encode_jpeg(load_photo(PHOTOS[3])), k=1).results[0].id == "extra/one"
    assert list(writer.delete(["extra/one"]).deleted) == ["extra/one"]
    assert writer.stats().images == 6


def test_internal_services_accept_only_the_internal_token(cluster, secrets_dir, reader):
    _, tokens = secrets_dir
    stats = reader.stats()
    shard_addr, ext_addr = stats.shards[0].address, stats.extractors[0]
    internal = (("authorization", f"Bearer {tokens.internal}"),)
    with grpc.insecure_channel(shard_addr) as ch:
        shard = shard_pb2_grpc.ShardStub(ch)
        attempts = {
            "ListVectors": lambda md: shard.ListVectors(shard_pb2.ListVectorsRequest(limit=10), metadata=md, timeout=10),
            "SetWhitening": lambda md: shard.SetWhitening(shard_pb2.SetWhiteningRequest(), metadata=md, timeout=10),
            "Add": lambda md: shard.Add(shard_pb2.ShardAddRequest(), metadata=md, timeout=10),
            "Delete": lambda md: shard.Delete(shard_pb2.ShardDeleteRequest(ids=["x"]), metadata=md, timeout=10),
        }
        for name, call in attempts.items():
            assert _code(lambda: call(()))[0] == UNAUTH, name
            for public in (tokens.write, tokens.read):
                assert _code(lambda: call((("authorization", f"Bearer {public}"),)))[0] == UNAUTH, name
        listed = shard.ListVectors(shard_pb2.ListVectorsRequest(limit=100), metadata=internal, timeout=10)
        assert len(listed.ids) > 0  # the broker's token works (this is what the broker sends)
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes stay open
        assert _code(lambda: _reflection_list(ch))[0] == UNAUTH
    with grpc.insecure_channel(ext_addr) as ch:
        ext = extractor_pb2_grpc.ExtractorStub(ch)
        assert _code(lambda: ext.Describe(extractor_pb2.DescribeRequest(), timeout=10))[0] == UNAUTH
        assert _code(lambda: ext.Extract(extractor_pb2.ExtractRequest(image=_query()), metadata=(("authorization", f"Bearer {tokens.write}"),), timeout=10))[0] == UNAUTH
        assert ext.Describe(extractor_pb2.DescribeRequest(), metadata=internal, timeout=10).ByteSize() > 0
    assert reader.stats().images == 6


def test_plaintext_to_the_tls_port_fails(cluster, secrets_dir):
    _, tokens = secrets_dir
    with RetrievalClient(cluster.broker_address, token=tokens.read) as c:
        code, _ = _code(lambda: c.stats(timeout_s=5))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_tls_without_the_ca_is_refused(cluster, secrets_dir, tmp_path):
    _, tokens = secrets_dir
    other = make_pki(tmp_path / "other")  # a CA that did not sign the broker's certificate
    with RetrievalClient(cluster.broker_address, token=tokens.read, tls_ca_file=str(other.ca)) as c:
        code, _ = _code(lambda: c.stats(timeout_s=5))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_raw_stub_with_bearer_metadata_over_tls(cluster, secrets_dir):
    """What any other-language client does: TLS channel + ``authorization: Bearer`` metadata."""
    pki, tokens = secrets_dir
    with _tls_channel(cluster.broker_address, pki.ca) as ch:
        stub = retrieval_pb2_grpc.RetrievalStub(ch)
        dim = stub.GetStats(retrieval_pb2.GetStatsRequest(), metadata=(("authorization", f"Bearer {tokens.read}"),), timeout=10).dim
        req = retrieval_pb2.SearchRequest(k=2, vector=to_tensor(np.ones(dim, np.float32) / np.sqrt(dim)))
        resp = stub.Search(req, metadata=(("authorization", f"bearer {tokens.read}"),), timeout=10)  # scheme is case-insensitive
    assert len(resp.results) == 2
