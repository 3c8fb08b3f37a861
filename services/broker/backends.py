"""The broker's view of its backends: ``ShardClient`` interface and gRPC implementations.

The broker depends on the interfaces only; unit tests use fakes, integration tests the gRPC
clients. Every call takes the caller's remaining time as ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from typing import Protocol, Sequence

import grpc

from loupe.v1 import extractor_pb2, extractor_pb2_grpc, shard_pb2, shard_pb2_grpc
from services.common.auth import AioBearerInterceptor
from services.common.errors import DeadlineExceeded, InvalidArgument, NotFound, Overloaded, Unavailable
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
    async def close(self) -> None: ...


class GrpcShardClient:
    """``ShardClient`` over a grpc.aio channel."""

    def __init__(self, shard_id: int, address: str, channel_options: Sequence[tuple[str, int]] = (), internal_token: str = "",
                 tls: InternalTls | None = None) -> None:
        self.shard_id = shard_id
        self.address = address
        self._channel = _internal_channel(address, channel_options, internal_token, tls)
        self._stub = shard_pb2_grpc.ShardStub(self._channel)

    async def search(self, request: shard_pb2.ShardSearchRequest, timeout_s: float) -> shard_pb2.ShardSearchResponse:
        return await self._stub.Search(request, timeout=timeout_s)

    async def add(self, request: shard_pb2.ShardAddRequest, timeout_s: float) -> shard_pb2.ShardAddResponse:
        return await self._stub.Add(request, timeout=timeout_s)

    async def delete(self, request: shard_pb2.ShardDeleteRequest, timeout_s: float) -> shard_pb2.ShardDeleteResponse:
        return await self._stub.Delete(request, timeout=timeout_s)

    async def get_features(self, request: shard_pb2.GetFeaturesRequest, timeout_s: float) -> shard_pb2.GetFeaturesResponse:
        return await self._stub.GetFeatures(request, timeout=timeout_s)

    async def sample_vectors(self, request: shard_pb2.SampleVectorsRequest, timeout_s: float) -> shard_pb2.SampleVectorsResponse:
        return await self._stub.SampleVectors(request, timeout=timeout_s)

    async def list_vectors(self, request: shard_pb2.ListVectorsRequest, timeout_s: float) -> shard_pb2.ListVectorsResponse:
        return await self._stub.ListVectors(request, timeout=timeout_s)

    async def set_whitening(self, request: shard_pb2.SetWhiteningRequest, timeout_s: float) -> shard_pb2.SetWhiteningResponse:
        return await self._stub.SetWhitening(request, timeout=timeout_s)

    async def stats(self, timeout_s: float) -> shard_pb2.ShardStatsResponse:
        return await self._stub.Stats(shard_pb2.ShardStatsRequest(shard_id=self.shard_id), timeout=timeout_s)

    async def search_batch(self, request: shard_pb2.ShardSearchBatchRequest, timeout_s: float) -> shard_pb2.ShardSearchBatchResponse:
        return await self._stub.SearchBatch(request, timeout=timeout_s)

    async def get_info(self, request: shard_pb2.GetInfoRequest, timeout_s: float) -> shard_pb2.GetInfoResponse:
        return await self._stub.GetInfo(request, timeout=timeout_s)

    async def list_ids(self, request: shard_pb2.ListIdsRequest, timeout_s: float) -> shard_pb2.ListIdsResponse:
        return await self._stub.ListIds(request, timeout=timeout_s)

    async def close(self) -> None:
        await self._channel.close()


class ExtractionSlots:
    """``capacity`` slots shared by two classes of callers: queries and bulk (indexing).

    A freed slot goes to the longest-waiting query first, then to bulk work, so a stream of
    AddImages calls cannot make searches wait behind it; each class has its own bound on
    waiters (``max_waiting``, 0 = unbounded), so indexing that fills its queue gets
    RESOURCE_EXHAUSTED while searches are still admitted.
    """

    def __init__(self, capacity: int, max_waiting: int = 0) -> None:
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.in_use = 0
        self._waiters: dict[bool, collections.deque[asyncio.Future[None]]] = {True: collections.deque(), False: collections.deque()}

    def waiting(self, query: bool | None = None) -> int:
        """Callers waiting for a slot (of one class, or all)."""
        if query is None:
            return len(self._waiters[True]) + len(self._waiters[False])
        return len(self._waiters[query])

    def full(self, query: bool) -> bool:
        """Whether a caller of this class would be refused (all slots busy and its queue full)."""
        return bool(self.max_waiting) and self.in_use >= self.capacity and self.waiting(query) >= self.max_waiting

    async def acquire(self, query: bool) -> None:
        """Wait for a slot (cancellable; a cancelled waiter gives up its place)."""
        if self.in_use < self.capacity and not self.waiting():
            self.in_use += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiters[query]
        queue.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over just as the caller gave up: pass it on
            elif fut in queue:
                queue.remove(fut)
            raise

    def release(self) -> None:
        """Hand the slot to the next waiter (queries first) or free it."""
        for cls in (True, False):
            queue = self._waiters[cls]
            while queue:
                fut = queue.popleft()
                if not fut.done():
                    fut.set_result(None)
                    return
        self.in_use -= 1


class ExtractorPool:
    """Round-robin over extractor replicas; a replica that is unreachable is skipped.

    Parameters
    ----------
    addresses : sequence of str
        host:port of each replica.
    max_concurrency_per_replica : int
        Calls in flight per replica before callers wait (back-pressure for indexing).
    internal_token : str
        Cluster-internal token sent with every call ("" = none).
    tls : InternalTls or None
        Mutual TLS to the replicas (None = plaintext).
    max_queue : int
        Calls of each class (queries, indexing) allowed to wait for a slot (0 = unbounded);
        beyond it ``extract`` raises ``Overloaded`` at once with ``retry_after_ms`` (admission
        control). Queries take freed slots before indexing (:class:`ExtractionSlots`).
    retry_after_ms : int
        Retry hint of that answer.
    """

    def __init__(self, addresses: Sequence[str], channel_options: Sequence[tuple[str, int]] = (), max_concurrency_per_replica: int = 2,
                 internal_token: str = "", tls: InternalTls | None = None, max_queue: int = 0, retry_after_ms: int = 100) -> None:
        if not addresses:
            raise ValueError("extractor addresses: at least one replica is required")
        self.addresses = list(addresses)
        self._channels = [_internal_channel(a, channel_options, internal_token, tls) for a in self.addresses]
        self._stubs = [extractor_pb2_grpc.ExtractorStub(c) for c in self._channels]
        self._rr = itertools.cycle(range(len(self._stubs)))
        self.concurrency = max_concurrency_per_replica * len(self._stubs)
        self._slots = ExtractionSlots(self.concurrency, max_queue)
        self.retry_after_ms = retry_after_ms

    @property
    def waiting(self) -> int:
        """Images waiting for an extraction slot (queries and indexing)."""
        return self._slots.waiting()

    async def extract(self, request: extractor_pb2.ExtractRequest, timeout_s: float, *, query: bool = False) -> extractor_pb2.ExtractResponse:
        """Extract on the next replica; on UNAVAILABLE try the others once each.

        ``query``: a search's image (waits ahead of indexing, in its own queue). Raises
        ``Overloaded`` without waiting when ``max_queue`` callers of its class already wait."""
        if self._slots.full(query):
            kind = "search" if query else "indexing"
            raise Overloaded(
                f"extractors: {self._slots.waiting(query)} {kind} images wait for {self.concurrency} extraction slots, the limit is "
                f"broker.max_extract_queue={self._slots.max_waiting}; retry after {self.retry_after_ms} ms",
                retry_after_ms=self.retry_after_ms,
            )
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(self._slots.acquire(query), timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded("deadline exceeded while waiting for an extraction slot") from None
        timeout_s = max(0.001, timeout_s - (time.monotonic() - t0))
        try:
            last: grpc.aio.AioRpcError | None = None
            for _ in range(len(self._stubs)):
                stub = self._stubs[next(self._rr)]
                try:
                    return await stub.Extract(request, timeout=timeout_s)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    last = exc
            raise Unavailable(f"no extractor replica reachable ({last.details() if last else 'none'})")
        finally:
            self._slots.release()

    async def describe(self, timeout_s: float) -> extractor_pb2.DescribeResponse:
        """Model description from the first reachable replica."""
        for stub in self._stubs:
            try:
                return await stub.Describe(extractor_pb2.DescribeRequest(), timeout=timeout_s)
            except grpc.aio.AioRpcError:
                continue
        raise Unavailable("no extractor replica reachable")

    async def close(self) -> None:
        for c in self._channels:
            await c.close()


def from_rpc_error(exc: grpc.aio.AioRpcError, what: str) -> Exception:
    """A backend's status as the matching domain error, prefixed with ``what`` (e.g. "shard 1")."""
    code = exc.code()
    msg = f"{what}: {exc.details()}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(exc.details() or msg)  # backends already name the field
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        busy = "concurrent rpc limit" in (exc.details() or "").lower()  # the backend's gRPC admission limit: transient
        return Overloaded(exc.details() or msg, retry_after_ms=100 if busy else None)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(msg)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(msg)
    return Unavailable(msg)
