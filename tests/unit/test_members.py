"""Hedged calls across replicas, and channels that follow a member's address (real gRPC servers)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.broker.members import MemberChannel, hedged
from services.common.grpc_server import ServerOptions, create_sync_server


def _after(delay: float, value: object = None, error: BaseException | None = None, log: list | None = None):
    async def run(timeout_s: float) -> object:
        if log is not None:
            log.append(("start", value, round(timeout_s, 1)))
        await asyncio.sleep(delay)
        if error is not None:
            raise error
        return value

    return run


def test_first_answer_wins_and_a_failure_fails_over_at_once() -> None:
    async def scenario() -> tuple[object, list]:
        log: list = []
        got = await hedged([_after(0.01, "a", RuntimeError("down"), log), _after(0.01, "b", log=log)], timeout_s=5.0)
        return got, log

    got, log = asyncio.run(scenario())
    assert got == "b" and [v for _, v, _ in log] == ["a", "b"]


def test_a_hung_attempt_is_hedged_and_cancelled() -> None:
    flag = {"cancelled": False}

    async def hung(timeout_s: float) -> str:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            flag["cancelled"] = True
            raise
        return "never"

    async def scenario() -> tuple[object, float]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        got = await hedged([hung, _after(0.01, "b")], timeout_s=5.0, hedge_after_s=0.1)
        await asyncio.sleep(0)  # let the cancellation land
        return got, loop.time() - t0

    got, took = asyncio.run(scenario())
    assert got == "b" and took < 4.0 and flag["cancelled"]


def test_without_hedging_a_hung_attempt_runs_out_the_deadline() -> None:
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(hedged([_after(10, "a"), _after(0.01, "b")], timeout_s=0.2, hedge_after_s=0))


def test_non_retryable_errors_are_raised_at_once_and_the_last_error_when_all_fail() -> None:
    bad = ValueError("bad input")
    with pytest.raises(ValueError, match="bad input"):
        asyncio.run(hedged([_after(0.01, error=bad), _after(0.01, "b")], 5.0, retryable=lambda e: not isinstance(e, ValueError)))
    with pytest.raises(RuntimeError, match="second"):
        asyncio.run(hedged([_after(0.01, error=RuntimeError("first")), _after(0.01, error=RuntimeError("second"))], 5.0))


def _health_server():
    return create_sync_server(lambda s: None, ["loupe.test"], ServerOptions(host="127.0.0.1", port=0))


def test_member_channel_follows_a_member_that_moved() -> None:
    """The first server goes away; the registry now names the second: a call that meets UNAVAILABLE
    looks the member up, moves its channel and succeeds within the same call."""
    first, second = _health_server(), _health_server()
    current = {"address": f"127.0.0.1:{first.port}"}
    moves: list[int] = []

    async def resolve() -> str:
        return current["address"]

    async def scenario() -> tuple[str, str, str]:
        member = MemberChannel("test member", current["address"], grpc.aio.insecure_channel, health_pb2_grpc.HealthStub, resolve,
                               min_refresh_s=0.0, on_move=lambda: moves.append(1))
        check = lambda stub, t: stub.Check(health_pb2.HealthCheckRequest(service="loupe.test"), timeout=t)  # noqa: E731
        try:
            a = await member.call(check, 2.0)
            before = member.address
            first.stop(0)
            current["address"] = f"127.0.0.1:{second.port}"
            b = await member.call(check, 5.0)
            return before, member.address, f"{health_pb2.HealthCheckResponse.ServingStatus.Name(a.status)}/{health_pb2.HealthCheckResponse.ServingStatus.Name(b.status)}"
        finally:
            await member.close()

    try:
        before, after, statuses = asyncio.run(scenario())
    finally:
        first.stop(0)
        second.stop(0)
    assert before == f"127.0.0.1:{first.port}" and after == f"127.0.0.1:{second.port}"
    assert statuses == "SERVING/SERVING" and moves == [1]


def test_member_channel_without_a_registry_keeps_its_address() -> None:
    async def scenario() -> bool:
        member = MemberChannel("fixed", "127.0.0.1:1", grpc.aio.insecure_channel, health_pb2_grpc.HealthStub)
        try:
            return await member.refresh()
        finally:
            await member.close()

    assert asyncio.run(scenario()) is False
