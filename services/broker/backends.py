"""The broker's view of its backends: ``ShardClient`` interface and gRPC implementations.

The broker depends on the interfaces only; unit tests use fakes, integration tests the gRPC
clients. Every call takes the caller's remaining time as ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Awaitable, Callable, Protocol, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loupe.v1 import extractor_pb2, extractor_pb2_grpc, shard_pb2, shard_pb2_grpc
from services.broker.admission import Slots
from services.broker.backend_errors import from_rpc_error, translate_rpc_errors
from services.common.auth import AioBearerInterceptor
from services.common.errors import DeadlineExceeded, Unavailable
from services.broker.members import MemberChannel, Resolve, hedged
from services.common.tls import InternalTls


def _internal_channel(address: str, channel_options: Sequence[tuple[str, int]], internal_token: str, tls: InternalTls | None) -> grpc.aio.Channel:
    """Channel to a shard/extractor: the cluster-internal token on every call when one is set,
    mutual TLS when ``tls`` is set."""
    interceptors = [AioBearerInterceptor(internal_token)] if internal_token else None
    if tls is not None:
        options = list(channel_options) + tls.channel_options()
        return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=list(channel_options), interceptors=interceptors)


class ShardClient(Protocol):
    """What the broker needs from one shard."""

    shard_id: int
    address: str

    async def search(self, request: shard_pb2.ShardSearchRequest, timeout_s: float) -> shard_pb2.ShardSearchResponse: ...
    async def add(self, request: shard_pb2.ShardAddRequest, timeout_s: float) -> shard_pb2.ShardAddResponse: ...
    async def delete(self, request: shard_pb2.ShardDeleteRequest, timeout_s: float) -> shard_pb2.ShardDeleteResponse: ...
    async def get_features(self, request: shard_pb2.GetFeaturesRequest, timeout_s: float) -> shard_pb2.GetFeaturesResponse: ...
    async def sample_vectors(self, request: shard_pb2.SampleVectorsRequest, timeout_s: float) -> shard_pb2.SampleVectorsResponse: ...
    async def list_vectors(self, request: shard_pb2.ListVectorsRequest, timeout_s: float) -> shard_pb2.ListVectorsResponse: ...
    async def set_whitening(self, request: shard_pb2.SetWhiteningRequest, timeout_s: float) -> shard_pb2.SetWhiteningResponse: ...
    async def stats(self, timeout_s: float) -> shard_pb2.ShardStatsResponse: ...
    async def search_batch(self, request: shard_pb2.ShardSearchBatchRequest, timeout_s: float) -> shard_pb2.ShardSearchBatchResponse: ...
    async def get_info(self, request: shard_pb2.GetInfoRequest, timeout_s: float) -> shard_pb2.GetInfoResponse: ...
    async def list_ids(self, request: shard_pb2.ListIdsRequest, timeout_s: float) -> shard_pb2.ListIdsResponse: ...
    async def list_versions(self, request: shard_pb2.ListVersionsRequest, timeout_s: float) -> shard_pb2.ListVersionsResponse: ...
    async def get_records(self, request: shard_pb2.GetRecordsRequest, timeout_s: float) -> shard_pb2.GetRecordsResponse: ...
    async def verify(self, request: shard_pb2.ShardVerifyRequest, timeout_s: float) -> shard_pb2.ShardVerifyResponse: ...
    async def refresh(self) -> bool: ...
    async def close(self) -> None: ...


@translate_rpc_errors(lambda self: f"shard {self.shard_id}")
class GrpcShardClient:
    """``ShardClient`` over a grpc.aio channel that follows the shard's address (``MemberChannel``).

    Its calls raise loupe's domain errors, never gRPC's (``translate_rpc_errors``)."""

    def __init__(self, shard_id: int, address: str, channel_options: Sequence[tuple[str, int]] = (), internal_token: str = "",
                 tls: InternalTls | None = None, resolve: Resolve | None = None, on_move: Callable[[], None] | None = None) -> None:
        self.shard_id = shard_id
        self._member: MemberChannel[shard_pb2_grpc.ShardStub] = MemberChannel(
            f"shard {shard_id}", address, lambda a: _internal_channel(a, channel_options, internal_token, tls), shard_pb2_grpc.ShardStub,
            resolve, on_move=on_move,
        )

    @property
    def address(self) -> str:
        """The shard's current address (it changes when the shard moves)."""
        return self._member.address

    async def refresh(self) -> bool:
        """Look the shard's address up again (health checks call this after a failure)."""
        return await self._member.refresh()

    async def search(self, request: shard_pb2.ShardSearchRequest, timeout_s: float) -> shard_pb2.ShardSearchResponse:
        return await self._member.call(lambda stub, t: stub.Search(request, timeout=t), timeout_s)

    async def add(self, request: shard_pb2.ShardAddRequest, timeout_s: float) -> shard_pb2.ShardAddResponse:
        return await self._member.call(lambda stub, t: stub.Add(request, timeout=t), timeout_s)

    async def delete(self, request: shard_pb2.ShardDeleteRequest, timeout_s: float) -> shard_pb2.ShardDeleteResponse:
        return await self._member.call(lambda stub, t: stub.Delete(request, timeout=t), timeout_s)

    async def get_features(self, request: shard_pb2.GetFeaturesRequest, timeout_s: float) -> shard_pb2.GetFeaturesResponse:
        return await self._member.call(lambda stub, t: stub.GetFeatures(request, timeout=t), timeout_s)

    async def sample_vectors(self, request: shard_pb2.SampleVectorsRequest, timeout_s: float) -> shard_pb2.SampleVectorsResponse:
        return await self._member.call(lambda stub, t: stub.SampleVectors(request, timeout=t), timeout_s)

    async def list_vectors(self, request: shard_pb2.ListVectorsRequest, timeout_s: float) -> shard_pb2.ListVectorsResponse:
        return await self._member.call(lambda stub, t: stub.ListVectors(request, timeout=t), timeout_s)

    async def set_whitening(self, request: shard_pb2.SetWhiteningRequest, timeout_s: float) -> shard_pb2.SetWhiteningResponse:
        return await self._member.call(lambda stub, t: stub.SetWhitening(request, timeout=t), timeout_s)

    async def stats(self, timeout_s: float) -> shard_pb2.ShardStatsResponse:
        request = shard_pb2.ShardStatsRequest(shard_id=self.shard_id)
        return await self._member.call(lambda stub, t: stub.Stats(request, timeout=t), timeout_s)

    async def search_batch(self, request: shard_pb2.ShardSearchBatchRequest, timeout_s: float) -> shard_pb2.ShardSearchBatchResponse:
        return await self._member.call(lambda stub, t: stub.SearchBatch(request, timeout=t), timeout_s)

    async def get_info(self, request: shard_pb2.GetInfoRequest, timeout_s: float) -> shard_pb2.GetInfoResponse:
        return await self._member.call(lambda stub, t: stub.GetInfo(request, timeout=t), timeout_s)

    async def list_ids(self, request: shard_pb2.ListIdsRequest, timeout_s: float) -> shard_pb2.ListIdsResponse:
        return await self._member.call(lambda stub, t: stub.ListIds(request, timeout=t), timeout_s)

    async def list_versions(self, request: shard_pb2.ListVersionsRequest, timeout_s: float) -> shard_pb2.ListVersionsResponse:
        return await self._member.call(lambda stub, t: stub.ListVersions(request, timeout=t), timeout_s)

    async def get_records(self, request: shard_pb2.GetRecordsRequest, timeout_s: float) -> shard_pb2.GetRecordsResponse:
        return await self._member.call(lambda stub, t: stub.GetRecords(request, timeout=t), timeout_s)

    async def verify(self, request: shard_pb2.ShardVerifyRequest, timeout_s: float) -> shard_pb2.ShardVerifyResponse:
        return await self._member.call(lambda stub, t: stub.Verify(request, timeout=t), timeout_s)

    async def close(self) -> None:
        await self._member.close()


class ExtractorPool:
    """Extractor replicas behind one admission queue; a dead, moved or hung replica costs latency, not errors.

    Each call goes to the next healthy replica (round robin); a replica that fails (UNAVAILABLE,
    or no answer within ``hedge_after_s``) is followed at once, or in parallel, by the next one
    (:func:`~services.broker.members.hedged`). Replicas that failed a call or a health check are
    tried last until they answer again. Every replica is a :class:`MemberChannel`: a restarted
    replica is reached at its new address.

    Parameters
    ----------
    addresses : sequence of str
        host:port of each replica at start-up.
    max_concurrency_per_replica : int
        Calls in flight per replica before callers wait (back-pressure for indexing).
    internal_token : str
        Cluster-internal token sent with every call ("" = none).
    tls : InternalTls or None
        Mutual TLS to the replicas (None = plaintext).
    max_queue : int
        Calls of each class (queries, indexing) allowed to wait for a slot (0 = unbounded);
        beyond it ``extract`` raises ``Overloaded`` at once with ``retry_after_ms`` (admission
        control). Queries take freed slots before indexing (:class:`~services.broker.admission.Slots`).
    retry_after_ms : int
        Retry hint of that answer.
    resolve : callable ``(replica id) -> Resolve`` or None
        Registry lookups of each replica's address (None = fixed addresses).
    hedge_after_s : float
        A call with no answer after this long is sent to another replica too (0 = only on failure).
    on_move : callable or None
        Called when a replica is found at a new address (metrics).
    """

    def __init__(self, addresses: Sequence[str], channel_options: Sequence[tuple[str, int]] = (), max_concurrency_per_replica: int = 2,
                 internal_token: str = "", tls: InternalTls | None = None, max_queue: int = 0, retry_after_ms: int = 100,
                 resolve: Callable[[int], Resolve] | None = None, hedge_after_s: float = 0.0,
                 on_move: Callable[[], None] | None = None) -> None:
        if not addresses:
            raise ValueError("extractor addresses: at least one replica is required")
        self._members: list[MemberChannel[extractor_pb2_grpc.ExtractorStub]] = [
            MemberChannel(f"extractor replica {i}", a, lambda addr: _internal_channel(addr, channel_options, internal_token, tls),
                          extractor_pb2_grpc.ExtractorStub, resolve(i) if resolve else None, on_move=on_move)
            for i, a in enumerate(addresses)
        ]
        self._rr = itertools.count()
        self._suspect: set[int] = set()
        self.concurrency = max_concurrency_per_replica * len(self._members)
        self.slots = Slots(self.concurrency, max_queue, name="extraction", setting="broker.max_extract_queue", retry_after_ms=retry_after_ms)
        self.hedge_after_s = hedge_after_s

    @property
    def addresses(self) -> list[str]:
        """Current address of each replica."""
        return [m.address for m in self._members]

    def _order(self) -> list[int]:
        """Replicas to try: healthy ones in round-robin order, then the suspect ones."""
        n = len(self._members)
        first = next(self._rr) % n
        ring = [(first + k) % n for k in range(n)]
        return [i for i in ring if i not in self._suspect] + [i for i in ring if i in self._suspect]

    async def extract(self, request: extractor_pb2.ExtractRequest, timeout_s: float, *, query: bool = False) -> extractor_pb2.ExtractResponse:
        """Extract on the next healthy replica, failing over (and hedging) to the others.

        ``query``: a search's image (waits ahead of indexing, in its own queue). Raises
        ``Overloaded`` without waiting when ``max_queue`` callers of its class already wait."""
        t0 = time.monotonic()
        await self.slots.admit(query, timeout_s, "search images" if query else "indexing images")  # admitted or refused before its first await
        timeout_s = max(0.001, timeout_s - (time.monotonic() - t0))
        try:
            attempts = [self._attempt(i, request) for i in self._order()]
            try:
                return await hedged(attempts, timeout_s, self.hedge_after_s, retryable=_replica_failure)
            except asyncio.TimeoutError:
                raise DeadlineExceeded(f"no extractor replica answered within {timeout_s:.2f} s") from None
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    raise Unavailable(f"no extractor replica reachable ({exc.details()})") from None
                raise from_rpc_error(exc, "image") from None
        finally:
            self.slots.release()

    def _attempt(self, i: int, request: extractor_pb2.ExtractRequest) -> Callable[[float], Awaitable[extractor_pb2.ExtractResponse]]:
        member = self._members[i]

        async def run(timeout_s: float) -> extractor_pb2.ExtractResponse:
            try:
                resp = await member.call(lambda stub, t: stub.Extract(request, timeout=t), timeout_s)
            except grpc.aio.AioRpcError as exc:
                if _replica_failure(exc):
                    self._suspect.add(i)
                raise
            except asyncio.CancelledError:  # hedged away: another replica answered first
                raise
            self._suspect.discard(i)
            return resp

        return run

    async def describe(self, timeout_s: float) -> extractor_pb2.DescribeResponse:
        """Model description from the first reachable replica."""
        for i in self._order():
            try:
                return await self._members[i].call(lambda stub, t: stub.Describe(extractor_pb2.DescribeRequest(), timeout=t), timeout_s)
            except grpc.aio.AioRpcError:
                continue
        raise Unavailable("no extractor replica reachable")

    async def check(self, timeout_s: float) -> list[bool]:
        """One health round: each replica's gRPC health (``loupe.v1.Extractor``) at once; a replica
        that fails is looked up again (it may have moved) and tried last until it answers."""

        async def one(i: int) -> bool:
            member = self._members[i]
            try:
                await member.call(
                    lambda _stub, t: health_pb2_grpc.HealthStub(member.channel).Check(
                        health_pb2.HealthCheckRequest(service="loupe.v1.Extractor"), timeout=t),
                    timeout_s,
                )
            except grpc.aio.AioRpcError:
                self._suspect.add(i)
                await member.refresh()
                return False
            self._suspect.discard(i)
            return True

        return list(await asyncio.gather(*(one(i) for i in range(len(self._members)))))

    async def close(self) -> None:
        for m in self._members:
            await m.close()


def _replica_failure(exc: BaseException) -> bool:
    """Failures another replica may not have: the replica is gone, moved, hung or overloaded."""
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in (
        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
