"""The broker's backend clients raise loupe's errors, never gRPC's (services.broker.backend_errors)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.broker.backend_errors import failure_reason, from_rpc_error, translate_rpc_errors
from services.common.errors import DeadlineExceeded, InvalidArgument, NotFound, Overloaded, Unavailable, public_details


def rpc_error(code: grpc.StatusCode, details: str = "boom") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


@pytest.mark.parametrize("code, kind", [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument), (grpc.StatusCode.NOT_FOUND, NotFound),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, Overloaded), (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
    (grpc.StatusCode.UNAVAILABLE, Unavailable), (grpc.StatusCode.DATA_LOSS, Unavailable), (grpc.StatusCode.INTERNAL, Unavailable),
])
def test_each_status_becomes_its_domain_error(code, kind):
    err = from_rpc_error(rpc_error(code, "ids[0]: bad"), "shard 2")
    assert type(err) is kind and failure_reason(err) == code.name
    assert str(err) == ("ids[0]: bad" if kind in (InvalidArgument, Overloaded) else "shard 2: ids[0]: bad")


def test_failure_reason_of_errors_that_never_crossed_the_wire():
    assert failure_reason(Unavailable("x")) == "UNAVAILABLE"
    assert failure_reason(TimeoutError()) == "TimeoutError"


def test_client_decorator_translates_every_public_coroutine_but_close():
    @translate_rpc_errors(lambda self: f"shard {self.shard_id}")
    class Client:
        shard_id = 3

        async def search(self, code):
            raise rpc_error(code)

        async def close(self):
            raise rpc_error(grpc.StatusCode.UNAVAILABLE)

        def sync(self):
            return "untouched"

    c = Client()
    with pytest.raises(Unavailable, match="^shard 3: boom$"):
        asyncio.run(c.search(grpc.StatusCode.UNAVAILABLE))
    with pytest.raises(InvalidArgument):
        asyncio.run(c.search(grpc.StatusCode.INVALID_ARGUMENT))
    with pytest.raises(grpc.aio.AioRpcError):
        asyncio.run(c.close())
    assert c.sync() == "untouched" and Client.search.__name__ == "search"


@pytest.mark.parametrize("text, public", [
    ("shard 1: failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:41235: Connection refused",
     "shard 1: failed to connect to all addresses; last error: UNAVAILABLE: <internal address>: Connection refused"),
    ("no extractor replica reachable (last error: UNKNOWN: ipv6:%5B::1%5D:5000: Failed)",
     "no extractor replica reachable (last error: UNKNOWN: <internal address>: Failed)"),
    ("upstream 10.1.2.3:50051 reset, [fe80::1]:7000 too", "upstream <internal address> reset, <internal address> too"),
    ("queries[3].k: must be in 1..1000, got 0", "queries[3].k: must be in 1..1000, got 0"),
    ("id: no image 'host:8080' is indexed", "id: no image 'host:8080' is indexed"),
])
def test_public_details_leave_out_internal_addresses_only(text, public):
    assert public_details(text) == public
