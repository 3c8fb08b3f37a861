"""The server helper's TLS options on a real gRPC server (no cluster): server TLS, mutual TLS
(``tls_client_ca_file``) and the token interceptor on both server kinds."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from secure_setup import make_pki

from services.common.auth import AuthPolicy
from services.common.grpc_server import ServerOptions, create_aio_server, create_sync_server


def _check(channel: grpc.Channel) -> grpc.StatusCode:
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_mutual_tls_requires_a_client_certificate(pki):
    opts = ServerOptions(tls_cert_file=str(pki.cert), tls_key_file=str(pki.key), tls_client_ca_file=str(pki.ca))
    running = create_sync_server(lambda s: None, [], opts)
    try:
        addr = f"127.0.0.1:{running.port}"
        ca = pki.ca.read_bytes()
        with grpc.secure_channel(addr, grpc.ssl_channel_credentials(ca)) as ch:
            assert _check(ch) == grpc.StatusCode.UNAVAILABLE  # no client certificate
        creds = grpc.ssl_channel_credentials(ca, pki.client_key.read_bytes(), pki.client_cert.read_bytes())
        with grpc.secure_channel(addr, creds) as ch:
            assert _check(ch) == grpc.StatusCode.OK
        with grpc.insecure_channel(addr) as ch:
            assert _check(ch) == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(0)


def test_half_a_tls_configuration_is_refused(pki):
    with pytest.raises(ValueError, match="tls_cert_file, tls_key_file"):
        create_sync_server(lambda s: None, [], ServerOptions(tls_cert_file=str(pki.cert)))


def test_aio_server_tls_and_open_health_with_auth_on(pki):
    async def run() -> None:
        opts = ServerOptions(tls_cert_file=str(pki.cert), tls_key_file=str(pki.key), auth=AuthPolicy.from_tokens({"t": "read"}))
        running = await create_aio_server(lambda s: None, ["loupe.v1.Retrieval"], opts)
        try:
            async with grpc.aio.secure_channel(f"127.0.0.1:{running.port}", grpc.ssl_channel_credentials(pki.ca.read_bytes())) as ch:
                resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="loupe.v1.Retrieval"), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await running.stop(0)

    asyncio.run(run())
