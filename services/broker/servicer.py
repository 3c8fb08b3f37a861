"""The public ``loupe.v1.Retrieval`` servicer: a thin gRPC face.

Each rpc here only validates what the request must satisfy before any work (limits from
``services.common.limits``), runs its body through ``_observe`` (admission control, in-flight /
latency / request-by-code metrics, the error → status table of ``services.common.errors``) and
delegates the work to one module:

- how a search runs: ``services.broker.search_pipeline`` (plan: ``search_plan``);
- writes (AddImages, Delete routing): ``services.broker.writes``;
- collection administration (stats, whitening, graphs): ``services.broker.admin``;
- backups and restores: ``services.broker.backups`` (over ``services.backup``);
- resharding: ``services.broker.resharding`` (where each read and write goes: ``services.broker.routing``);
- reads of stored records (GetImages, ListImages and its cursor): ``services.broker.reads``;
- many queries in one call (SearchBatch): ``services.broker.batch``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Sequence, TypeVar

import grpc
from grpc_health.v1 import health_pb2

from loupe.v1 import retrieval_pb2, retrieval_pb2_grpc
from services.broker.admin import Admin
from services.broker.admission import RerankBudget
from services.broker.backups import Backups
from services.broker.backends import ExtractorPool, GrpcShardClient, ShardClient
from services.broker.replicas import ReplicatedShard
from services.broker.resharding import Resharder, ShardFleet
from services.broker.routing import Routing
from services.broker.versions import VersionClock
from services.space.placement import PLACEMENT_VERSION, Placement, shard_member
from services.broker.members import Resolve
from services.broker.batch import BatchSearcher
from services.broker.collection_model import CollectionModel
from services.broker.config import BrokerConfig
from services.broker.deadlines import Deadline, PerCallBudget
from services.broker.metrics import BrokerMetrics
from services.broker.reads import Reader
from services.broker.search_pipeline import SearchPipeline
from services.broker.search_plan import build_plan, validate_search
from services.broker.shard_health import ShardHealth
from services.broker.writes import Writer
from services.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    Overloaded,
    Unavailable,
    public_details,
    retry_trailer,
    status_for,
)
from services.common.grpc_server import RunningAioServer, ServerOptions, create_aio_server
from services.common.message_size import MessageBudget
from services.common.tls import InternalTls

__all__ = ["BrokerConfig", "RetrievalServicer", "RunningBroker", "create_server"]

log = logging.getLogger(__name__)
T = TypeVar("T")

SHARDS_HEALTH_SERVICE = "loupe.shards"
"""gRPC health service name: SERVING while every shard answered within ``shard_down_grace_s``."""

Lookup = Callable[[str, int], Awaitable["str | None"]]
"""``(role, member id) -> current address`` from the cluster's registry."""


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServicer):
    """Broker: talks to extractor replicas and every shard; holds no image data itself."""

    def __init__(
        self,
        extractors: ExtractorPool,
        shards: Sequence[ShardClient],
        metrics: BrokerMetrics,
        config: BrokerConfig = BrokerConfig(),
        budget: MessageBudget = MessageBudget(),
        clock: VersionClock | None = None,
        placement_rule: str = PLACEMENT_VERSION,
    ) -> None:
        if not shards:
            raise ValueError("shards: at least one shard is required")
        ids = sorted(s.shard_id for s in shards)
        if ids != list(range(len(shards))):
            raise ValueError(f"shards: ids must be 0..{len(shards) - 1}, got {ids}")
        self.extractors = extractors
        self.shards = sorted(shards, key=lambda s: s.shard_id)
        self.metrics = metrics
        self.config = config
        self.collection = CollectionModel(config.data_dir)
        self.metrics.graph_images.set_function(lambda: len(self.collection.graph) if self.collection.graph is not None else 0)
        self._inflight = 0
        self._verify_pool = ThreadPoolExecutor(max_workers=config.verify_threads, thread_name_prefix="loupe-verify")
        self.routing = Routing(Placement(len(self.shards), placement_rule))  # self.shards: one list, a reshard grows and cuts it
        self.pipeline = SearchPipeline(extractors, self.shards, self.collection, metrics, config, self._verify_pool, budget, self.routing)
        self.rerank = RerankBudget(config.rerank_slots, config.max_rerank_queue, config.retry_after_ms)
        metrics.observe_slots("rerank", self.rerank.slots)
        metrics.observe_slots("extract", extractors.slots)
        self.clock = clock or VersionClock()
        self.writer = Writer(extractors, self.shards, self.collection, metrics, config, self.clock, self.routing)
        self.reader = Reader(self.shards, config, self.routing)
        self.admin = Admin(extractors, self.shards, self.collection, metrics, config, self.reader, self.routing)
        self.batch = BatchSearcher(self.pipeline, config, self.rerank)
        self.backups = Backups(extractors, self.shards, self.collection, self.clock, budget.max_message_bytes, routing=self.routing)
        self.resharder = Resharder(self.shards, self.routing, self.clock, self.collection, self.backups.exclusive,
                                   on_retire=metrics.forget_shard)

    # --- plumbing -------------------------------------------------------------------------
    async def _observe(self, method: str, context: grpc.aio.ServicerContext, body: Callable[[], Awaitable[T]]) -> T:
        """Run an RPC body with in-flight/latency/status metrics and the error → status table."""
        self.metrics.inflight.labels(method).inc()
        self._inflight += 1
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            self._admit()
            return await body()
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            mapped = status_for(exc)
            if mapped is None:
                log.exception("internal error in %s", method)
                code = grpc.StatusCode.INTERNAL
                await context.abort(code, "internal error (see broker log)")
            code = mapped
            trailer = retry_trailer(exc, code)
            if trailer:
                context.set_trailing_metadata(trailer)
            details = public_details(str(exc))
            if details != str(exc):
                log.warning("%s answered %s: %s", method, code.name, exc)  # the addresses stay in the log
            await context.abort(code, details)
            raise  # unreachable: abort raises
        finally:
            self._inflight -= 1
            self.metrics.inflight.labels(method).dec()
            self.metrics.request_seconds.labels(method).observe(time.perf_counter() - t0)
            self.metrics.requests.labels(method, code.name).inc()

    def _admit(self) -> None:
        """Admission control: beyond ``max_inflight`` calls, RESOURCE_EXHAUSTED at once, with a retry hint."""
        if self._inflight > self.config.max_inflight:
            raise Overloaded(
                f"broker: {self._inflight - 1} requests in flight, the limit is broker.max_inflight={self.config.max_inflight}; "
                f"retry after {self.config.retry_after_ms} ms",
                retry_after_ms=self.config.retry_after_ms,
            )

    def _deadline(self, context: grpc.aio.ServicerContext) -> Deadline:
        return Deadline(context.time_remaining(), self.config.default_timeout_s)

    # --- Search ---------------------------------------------------------------------------
    async def Search(self, request: retrieval_pb2.SearchRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.SearchResponse:
        return await self._observe("Search", context, lambda: self._search(request, context))

    async def _search(self, request: retrieval_pb2.SearchRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.SearchResponse:
        deadline = self._deadline(context)
        validate_search(request, self.config)
        plan = build_plan(request.rerank, self.config)
        async with self.rerank.hold(plan.reranks, deadline):  # admitted or refused before any work
            return await self.pipeline.search(request, plan, deadline)

    # --- SearchBatch ----------------------------------------------------------------------
    async def SearchBatch(self, request: retrieval_pb2.SearchBatchRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.SearchBatchResponse:
        return await self._observe("SearchBatch", context, lambda: self.batch.search(request, self._deadline(context)))

    # --- GetImages / ListImages -----------------------------------------------------------
    async def GetImages(self, request: retrieval_pb2.GetImagesRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.GetImagesResponse:
        return await self._observe("GetImages", context, lambda: self.reader.get(request, self._deadline(context)))

    async def ListImages(self, request: retrieval_pb2.ListImagesRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.ListImagesResponse:
        return await self._observe("ListImages", context, lambda: self.reader.list(request, self._deadline(context)))

    # --- AddImages ------------------------------------------------------------------------
    async def AddImages(
        self, request_iterator: AsyncIterator[retrieval_pb2.AddImagesRequest], context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.AddImagesResponse:
        return await self._observe("AddImages", context, lambda: self._add_images(request_iterator, context))

    async def _add_images(
        self, request_iterator: AsyncIterator[retrieval_pb2.AddImagesRequest], context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.AddImagesResponse:
        if context.time_remaining() is None:  # an open-ended stream: bound each backend call instead
            deadline: Deadline | PerCallBudget = PerCallBudget(self.config.default_timeout_s)
        else:
            deadline = self._deadline(context)
        t0 = time.perf_counter()
        added = 0
        batch_no = 0
        replicas_stored = 0
        async for batch in request_iterator:
            if len(batch.images) > self.config.max_batch_images:
                raise InvalidArgument(
                    f"images: batch {batch_no} has {len(batch.images)} images, the limit is {self.config.max_batch_images}"
                )
            try:
                stored, replicas = await self.writer.add_batch(batch, deadline)
                added += stored
                replicas_stored = replicas if batch_no == 0 else min(replicas_stored, replicas)
            except (InvalidArgument, Unavailable, Overloaded, DeadlineExceeded, FailedPrecondition) as exc:
                err = type(exc)(f"{exc} ({added} images of earlier batches were stored)")
                if isinstance(exc, Overloaded):
                    err.retry_after_ms = exc.retry_after_ms
                raise err from None
            batch_no += 1
        return retrieval_pb2.AddImagesResponse(added=added, seconds=time.perf_counter() - t0, replicas_stored=replicas_stored)

    # --- Delete ---------------------------------------------------------------------------
    async def Delete(self, request: retrieval_pb2.DeleteRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.DeleteResponse:
        return await self._observe("Delete", context, lambda: self.writer.delete(request, self._deadline(context)))

    # --- GetStats -------------------------------------------------------------------------
    async def GetStats(self, request: retrieval_pb2.GetStatsRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.GetStatsResponse:
        return await self._observe("GetStats", context, lambda: self.admin.stats(self._deadline(context)))

    # --- FitWhitening ---------------------------------------------------------------------
    async def FitWhitening(self, request: retrieval_pb2.FitWhiteningRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.FitWhiteningResponse:
        return await self._observe("FitWhitening", context, lambda: self.admin.fit_whitening(request, self._deadline(context)))

    # --- BuildGraph -----------------------------------------------------------------------
    async def BuildGraph(self, request: retrieval_pb2.BuildGraphRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.BuildGraphResponse:
        return await self._observe("BuildGraph", context, lambda: self.admin.build_graph(request, self._deadline(context)))

    # --- Backup / ListBackups / Restore ---------------------------------------------------
    async def Backup(self, request: retrieval_pb2.BackupRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.BackupResponse:
        return await self._observe("Backup", context, lambda: self.backups.backup(request, self._deadline(context)))

    async def ListBackups(self, request: retrieval_pb2.ListBackupsRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.ListBackupsResponse:
        return await self._observe("ListBackups", context, lambda: self.backups.list(request))

    async def Restore(self, request: retrieval_pb2.RestoreRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.RestoreResponse:
        return await self._observe("Restore", context, lambda: self.backups.restore(request, self._deadline(context)))

    # --- Reshard --------------------------------------------------------------------------
    async def Reshard(self, request: retrieval_pb2.ReshardRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.ReshardResponse:
        return await self._observe("Reshard", context, lambda: self.resharder.reshard(request))


@dataclass
class RunningBroker:
    """A started broker: gRPC server, its servicer and the metrics exporter."""

    server: RunningAioServer
    servicer: RetrievalServicer
    metrics_port: int
    shard_health: ShardHealth | None = None

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self, grace_s: float = 2.0) -> None:
        """Graceful stop: NOT_SERVING, drain, close backend channels and the exporter."""
        await self.server.stop(grace_s)
        if self.shard_health is not None:
            await self.shard_health.stop()
        self.servicer._verify_pool.shutdown(wait=False)
        await self.servicer.extractors.close()
        for s in self.servicer.shards:
            await s.close()
        self.servicer.metrics.close()


async def create_server(
    extractor_addresses: Sequence[str],
    shard_addresses: Sequence[str | Sequence[str]],
    opts: ServerOptions,
    *,
    metrics_host: str = "127.0.0.1",
    metrics_port: int = 0,
    config: BrokerConfig = BrokerConfig(),
    internal_token: str = "",
    internal_tls: InternalTls | None = None,
    lookup: Lookup | None = None,
    placement_rule: str = PLACEMENT_VERSION,
    fleet: ShardFleet | None = None,
) -> RunningBroker:
    """Start the public Retrieval server (asyncio) and its ``/metrics`` exporter.

    ``shard_addresses[i]`` is the address of shard ``i`` at start-up, or the addresses of its
    replicas (replica j at j); ``lookup(role, member id)`` (role "shard" with
    ``shard_member(shard, replica)``, or "extractor" with the replica index) finds a member's
    current address when it moved (None = fixed addresses). ``internal_token`` ("" = none) is
    sent with every call to shards and extractors, over mutual TLS when ``internal_tls`` is set.
    ``placement_rule`` is the collection's (its layout file's); ``fleet`` starts and stops shards
    for ``Reshard`` (None: the broker cannot reshard). A reshard that stopped midway is finished
    (``Resharder.recover``) before this returns.
    """
    channel_opts = opts.channel_options()
    metrics = BrokerMetrics.create()

    def resolve(role: str, member: int) -> Resolve | None:
        return (lambda: lookup(role, member)) if lookup is not None else None

    def replicated(i: int, addresses: str | Sequence[str]) -> ReplicatedShard:
        addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        replicas = [
            GrpcShardClient(i, a, channel_opts, internal_token, internal_tls, resolve("shard", shard_member(i, j)),
                            metrics.backend_moves.labels("shard").inc)
            for j, a in enumerate(addresses)
        ]
        return ReplicatedShard(i, replicas, config.write_quorum, config.replica_hedge_s, on_change=metrics.observe_replicas)

    def new_shard(i: int, addresses: Sequence[str]) -> ReplicatedShard:  # a reshard's new shard
        shard = replicated(i, addresses)
        shard.whitening = servicer.collection.whitening_payload
        return shard

    servicer = RetrievalServicer(
        ExtractorPool(extractor_addresses, channel_opts, internal_token=internal_token, tls=internal_tls,
                      max_concurrency_per_replica=config.extract_slots_per_replica, max_queue=config.max_extract_queue,
                      retry_after_ms=config.retry_after_ms, resolve=lambda i: resolve("extractor", i),  # type: ignore[arg-type,return-value]
                      hedge_after_s=config.extract_hedge_s, on_move=metrics.backend_moves.labels("extractor").inc),
        [replicated(i, a) for i, a in enumerate(shard_addresses)],
        metrics,
        config,
        MessageBudget(opts.max_message_bytes),  # answers and shard calls sized under the same limit as the channels
        placement_rule=placement_rule,
    )
    servicer.resharder.fleet, servicer.resharder.make_shard = fleet, new_shard
    for shard in servicer.shards:  # a replica caught up from a peer gets the collection whitening too
        shard.whitening = servicer.collection.whitening_payload  # type: ignore[attr-defined]
    server = await create_aio_server(
        lambda s: retrieval_pb2_grpc.add_RetrievalServicer_to_server(servicer, s), ["loupe.v1.Retrieval"], opts
    )
    mport = metrics.serve(metrics_host, metrics_port)
    server.health.set(SHARDS_HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    def on_complete(complete: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if complete else health_pb2.HealthCheckResponse.NOT_SERVING
        server.health.set(SHARDS_HEALTH_SERVICE, status)

    replicated_shards = [s for s in servicer.shards if len(s.replicas) > 1]  # type: ignore[attr-defined]
    if replicated_shards:  # which replicas are in sync: decided before the first read
        await asyncio.gather(*(s.check(config.shard_health_timeout_s) for s in replicated_shards), return_exceptions=True)
    await servicer.resharder.recover()
    health = ShardHealth(servicer.shards, metrics, config.shard_health_period_s, config.shard_health_timeout_s,
                         extractors=servicer.extractors, down_grace_s=config.shard_down_grace_s, on_complete=on_complete,
                         observe_version=servicer.clock.observe).start()
    return RunningBroker(server, servicer, mport, health)
