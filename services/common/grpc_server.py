"""One helper to build a gRPC server the loupe way: health, reflection, message sizes, TLS."""

from __future__ import annotations

from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.auth import AioAuthInterceptor, AuthInterceptor, AuthPolicy
from services.common.decode_guard import AioDecodeGuardInterceptor, DecodeGuardInterceptor
from services.common.limits import MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class ServerOptions:
    """Transport settings shared by every loupe server.

    Attributes
    ----------
    host : str
        Interface to bind, e.g. "127.0.0.1" or "0.0.0.0".
    port : int
        Port; 0 picks a free one.
    max_message_bytes : int
        Largest request/response accepted (images and feature batches are large). Servicers
        size their answers under it (``services.common.message_size``).
    workers : int
        Thread-pool size of a sync server.
    max_concurrent_rpcs : int
        Calls admitted at once (queued ones included); more get RESOURCE_EXHAUSTED. 0 = no limit.
    tls_cert_file, tls_key_file : str
        PEM files; both set → TLS, both empty → plaintext.
    tls_client_ca_file : str
        PEM CA bundle; set (with TLS) → mutual TLS: clients must present a certificate it signed.
    auth : AuthPolicy or None
        Tokens this server accepts (``services.common.auth``); None = no authentication.
    """

    host: str = "127.0.0.1"
    port: int = 0
    max_message_bytes: int = MAX_MESSAGE_BYTES
    workers: int = 8
    max_concurrent_rpcs: int = 0
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    auth: AuthPolicy | None = None

    def interceptors(self, aio: bool) -> list:
        """Server interceptors: the token check when ``auth`` is set, then the decode guard."""
        guard = AioDecodeGuardInterceptor() if aio else DecodeGuardInterceptor()  # unparseable → INVALID_ARGUMENT
        if self.auth is None:
            return [guard]
        return [AioAuthInterceptor(self.auth) if aio else AuthInterceptor(self.auth), guard]

    def channel_options(self) -> list[tuple[str, int]]:
        """gRPC channel arguments for these message-size limits."""
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]


def _bind(server: grpc.Server | grpc.aio.Server, opts: ServerOptions) -> int:
    address = f"{opts.host}:{opts.port}"
    if opts.tls_cert_file or opts.tls_key_file:
        if not (opts.tls_cert_file and opts.tls_key_file):
            raise ValueError("tls_cert_file, tls_key_file: give both or neither")
        with open(opts.tls_key_file, "rb") as k, open(opts.tls_cert_file, "rb") as c:
            pair = [(k.read(), c.read())]
        if opts.tls_client_ca_file:
            with open(opts.tls_client_ca_file, "rb") as ca:
                creds = grpc.ssl_server_credentials(pair, root_certificates=ca.read(), require_client_auth=True)
        else:
            creds = grpc.ssl_server_credentials(pair)
        return server.add_secure_port(address, creds)
    return server.add_insecure_port(address)


def _register_common(server: grpc.Server | grpc.aio.Server, service_names: Sequence[str]) -> health.HealthServicer:
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in list(service_names) + [""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(list(service_names) + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return health_servicer


@dataclass
class RunningServer:
    """A started sync server with its port and health servicer."""

    server: grpc.Server
    port: int
    health: health.HealthServicer

    def stop(self, grace_s: float = 2.0) -> None:
        """Mark NOT_SERVING, then stop accepting and wait up to ``grace_s`` for in-flight calls."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()


def create_sync_server(
    register: Callable[[grpc.Server], None], service_names: Sequence[str], opts: ServerOptions
) -> RunningServer:
    """Build, bind and start a thread-pool gRPC server.

    ``register`` adds the servicers; ``service_names`` are their full names for health and
    reflection (e.g. ``"loupe.v1.Shard"``).
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=opts.workers),
        options=opts.channel_options(),
        maximum_concurrent_rpcs=opts.max_concurrent_rpcs or None,
        interceptors=opts.interceptors(aio=False),
    )
    register(server)
    hs = _register_common(server, service_names)
    port = _bind(server, opts)
    if port == 0:
        raise OSError(f"could not bind {opts.host}:{opts.port}")
    server.start()
    return RunningServer(server, port, hs)


@dataclass
class RunningAioServer:
    """A started asyncio server with its port and health servicer."""

    server: grpc.aio.Server
    port: int
    health: health.HealthServicer

    async def stop(self, grace_s: float = 2.0) -> None:
        """Mark NOT_SERVING, then stop with ``grace_s`` seconds for in-flight calls."""
        self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def create_aio_server(
    register: Callable[[grpc.aio.Server], None], service_names: Sequence[str], opts: ServerOptions
) -> RunningAioServer:
    """Asyncio twin of ``create_sync_server`` (used by the broker)."""
    server = grpc.aio.server(
        options=opts.channel_options(), maximum_concurrent_rpcs=opts.max_concurrent_rpcs or None, interceptors=opts.interceptors(aio=True)
    )
    register(server)
    hs = _register_common(server, service_names)
    port = _bind(server, opts)
    if port == 0:
        raise OSError(f"could not bind {opts.host}:{opts.port}")
    await server.start()
    return RunningAioServer(server, port, hs)
