"""The Python client retries transient statuses (with the server's pushback) and nothing else.

A real gRPC server on 127.0.0.1 plays the Retrieval service's GetStats with a scripted
sequence of answers and counts the attempts the real ``RetrievalClient`` makes.
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest

from loupe.client import RetrievalClient
from loupe.v1 import retrieval_pb2
from services.common.errors import InvalidArgument, Overloaded, grpc_errors


class _Scripted:
    """GetStats answers from ``script`` in turn (an exception is raised, None answers OK)."""

    def __init__(self, script: list[BaseException | None]) -> None:
        self.script = list(script)
        self.calls = 0
        self.lock = threading.Lock()

    @grpc_errors
    def GetStats(self, request: retrieval_pb2.GetStatsRequest, context: grpc.ServicerContext) -> retrieval_pb2.GetStatsResponse:
        with self.lock:
            step = self.script[min(self.calls, len(self.script) - 1)]
            self.calls += 1
        if step is not None:
            raise step
        return retrieval_pb2.GetStatsResponse(images=7)


@pytest.fixture
def serve():
    servers = []

    def start(script: list[BaseException | None]) -> tuple[_Scripted, str]:
        svc = _Scripted(script)
        handler = grpc.method_handlers_generic_handler("loupe.v1.Retrieval", {
            "GetStats": grpc.unary_unary_rpc_method_handler(
                svc.GetStats,
                request_deserializer=retrieval_pb2.GetStatsRequest.FromString,
                response_serializer=retrieval_pb2.GetStatsResponse.SerializeToString,
            )
        })
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return svc, f"127.0.0.1:{port}"

    yield start
    for s in servers:
        s.stop(0)


def test_overload_with_a_retry_hint_is_retried_until_it_succeeds(serve):
    svc, address = serve([Overloaded("busy", retry_after_ms=20), Overloaded("busy", retry_after_ms=20), None])
    with RetrievalClient(address) as c:
        assert c.stats(timeout_s=10).images == 7
    assert svc.calls == 3


def test_a_limit_is_not_retried(serve):
    svc, address = serve([Overloaded("image: over the pixel limit")])  # no hint: pushback -1
    with RetrievalClient(address) as c, pytest.raises(grpc.RpcError) as err:
        c.stats(timeout_s=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert svc.calls == 1


def test_invalid_argument_is_never_retried(serve):
    svc, address = serve([InvalidArgument("k: bad")])
    with RetrievalClient(address) as c, pytest.raises(grpc.RpcError) as err:
        c.stats(timeout_s=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert svc.calls == 1


def test_retries_can_be_turned_off(serve):
    svc, address = serve([Overloaded("busy", retry_after_ms=20), None])
    with RetrievalClient(address, retries=False) as c, pytest.raises(grpc.RpcError):
        c.stats(timeout_s=10)
    assert svc.calls == 1
