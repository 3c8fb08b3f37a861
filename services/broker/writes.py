"""Writes: AddImages batches (validate, extract, route by id hash, store) and Delete routing.

Upsert: re-adding an id replaces its whole record (features and metadata; metadata is not
merged). A write is acknowledged only after every owning shard has stored it durably and
indexed it on its write quorum of replicas, so a search, get or list that starts after the
acknowledgement sees it (read-your-writes; tests/integration/test_api.py,
tests/integration/test_moving_backends.py). Every write carries one version of the broker's clock
(``services.broker.versions``): replicas keep the newest version of each id.
"""

from __future__ import annotations

import asyncio
import time
from typing import Sequence

import numpy as np

from loupe.tensors import from_tensor, to_tensor
from loupe.v1 import extractor_pb2, retrieval_pb2, shard_pb2, types_pb2
from services.broker.backends import ExtractorPool, ShardClient
from services.broker.collection_model import CollectionModel
from services.broker.config import BrokerConfig
from services.broker.deadlines import Deadline, PerCallBudget
from services.broker.metrics import BrokerMetrics
from services.broker.routing import Routing
from services.broker.versions import VersionClock
from services.common import limits
from services.common.errors import InvalidArgument, NotFound, Overloaded, status_for
from services.common.limits import check_id

Budget = Deadline | PerCallBudget


class Writer:
    """Routes writes to the owning shards (``routing.write_owners(id)``: two while a reshard moves it)."""

    def __init__(self, extractors: ExtractorPool, shards: Sequence[ShardClient], collection: CollectionModel,
                 metrics: BrokerMetrics, config: BrokerConfig, clock: VersionClock, routing: Routing) -> None:
        self.routing = routing
        self.extractors = extractors
        self.shards = shards
        self.collection = collection
        self.metrics = metrics
        self.config = config
        self.clock = clock

    async def add_batch(self, batch: retrieval_pb2.AddImagesRequest, deadline: Budget) -> tuple[int, int]:
        """Validate, extract and store one AddImages batch; returns (images stored, the fewest
        replicas any of them was stored on).

        Nothing of the batch is written when one of its images is invalid (all are validated
        and extracted first)."""
        self.metrics.add_batch_images.observe(len(batch.images))
        seen: set[str] = set()
        for i, rec in enumerate(batch.images):
            check_id(rec.id, f"images[{i}].id")
            if rec.id in seen:
                raise InvalidArgument(f"images[{i}].id: duplicate id {rec.id!r} in one batch")
            seen.add(rec.id)
            limits.check_image_bytes(rec.image, f"images[{i}].image (id {rec.id!r})")
            limits.check_metadata(rec.metadata, f"images[{i}].metadata (id {rec.id!r})")
        # Extract everything first: a bad image fails the batch before any of it is written.
        sem = asyncio.Semaphore(self.extractors.concurrency)

        async def extract(i: int, rec: retrieval_pb2.ImageRecord) -> types_pb2.ImageFeatures:
            async with sem:
                try:
                    req = extractor_pb2.ExtractRequest(image=rec.image, want_regional=True, want_local=self.config.index_local)
                    return (await self.extractors.extract(req, deadline.remaining())).features
                except InvalidArgument as exc:
                    raise InvalidArgument(f"images[{i}] (id {rec.id!r}): {exc}") from None

        t_ext = time.perf_counter()
        features = await asyncio.gather(*(extract(i, r) for i, r in enumerate(batch.images)))
        self.metrics.stage_seconds.labels("extract").observe(time.perf_counter() - t_ext)
        if self.config.index_local:
            self._project_local(features)
        with self.routing.writes.running():  # routed and versioned at once: a reshard waits for it
            return await self._store(batch, features, deadline)

    async def _store(self, batch: retrieval_pb2.AddImagesRequest, features: Sequence[types_pb2.ImageFeatures],
                     deadline: Budget) -> tuple[int, int]:
        by_shard: dict[int, shard_pb2.ShardAddRequest] = {}
        version = self.clock.next()
        for rec, feat in zip(batch.images, features):
            for sid in self.routing.write_owners(rec.id):
                req = by_shard.setdefault(sid, shard_pb2.ShardAddRequest(shard_id=sid))
                req.records.add(id=rec.id, features=feat, metadata=dict(rec.metadata), version=version)

        async def write(sid: int, req: shard_pb2.ShardAddRequest) -> shard_pb2.ShardAddResponse:
            return await self.shards[sid].add(req, deadline.remaining())

        self.collection.graph_forget([rec.id for rec in batch.images])  # replaced images leave the graph
        outcomes = await asyncio.gather(*(write(s, r) for s, r in by_shard.items()), return_exceptions=True)
        answers = [o for o in outcomes if not isinstance(o, BaseException)]
        # an id is written to two shards while a reshard moves it: count each image once
        n = len({r.id for req, o in zip(by_shard.values(), outcomes) if not isinstance(o, BaseException) for r in req.records})
        self.metrics.images_added.inc(n)
        failed = [(sid, o) for sid, o in zip(by_shard, outcomes) if isinstance(o, BaseException)]
        if failed:
            raise partial_write_error(by_shard, outcomes, failed[0][1])
        return n, min((o.replicas for o in answers), default=0)

    def _project_local(self, features: Sequence[types_pb2.ImageFeatures]) -> None:
        """Replace raw local descriptors by their collection-PCA projection (learned on first use)."""
        raw = [from_tensor(f.local.descriptors, field="descriptors") if f.local.descriptors.shape else None for f in features]
        present = [r for r in raw if r is not None and len(r)]
        if not present:
            return
        if self.collection.local_pca is None:
            self.collection.ensure_local_pca(present)
        for f, r in zip(features, raw):
            if r is not None and len(r):
                f.local.descriptors.CopyFrom(to_tensor(self.collection.project(r).astype(np.float16)))

    async def delete(self, request: retrieval_pb2.DeleteRequest, deadline: Budget) -> retrieval_pb2.DeleteResponse:
        """Delete ids on their shards; NOT_FOUND when none existed."""
        if not request.ids:
            raise InvalidArgument("ids: at least one id is required")
        if len(request.ids) > limits.MAX_DELETE_IDS:
            raise InvalidArgument(f"ids: {len(request.ids)} ids, the limit is {limits.MAX_DELETE_IDS} per request")
        for i, image_id in enumerate(request.ids):
            check_id(image_id, f"ids[{i}]")
        with self.routing.writes.running():  # routed and versioned at once: a reshard waits for it
            return await self._delete(request, deadline)

    async def _delete(self, request: retrieval_pb2.DeleteRequest, deadline: Budget) -> retrieval_pb2.DeleteResponse:
        by_shard: dict[int, list[str]] = {}
        for image_id in request.ids:
            for sid in self.routing.write_owners(image_id):
                by_shard.setdefault(sid, []).append(image_id)
        owner = {image_id: self.routing.owner(image_id) for image_id in request.ids}  # as routed (a reshard may switch meanwhile)
        version = self.clock.next()

        async def one(sid: int, ids: list[str]) -> shard_pb2.ShardDeleteResponse:
            req = shard_pb2.ShardDeleteRequest(shard_id=sid, ids=ids, versions=[version] * len(ids))
            return await self.shards[sid].delete(req, deadline.remaining())

        results = await asyncio.gather(*(one(s, ids) for s, ids in by_shard.items()))
        self.collection.graph_forget(list(request.ids))
        resp = retrieval_pb2.DeleteResponse(replicas_stored=min((r.replicas for r in results), default=0))
        # during a reshard an id is deleted on two shards: it existed if it existed on its owner
        for sid, r in zip(by_shard, results):
            resp.deleted.extend(i for i in r.deleted if owner[i] == sid)
            resp.missing.extend(i for i in r.missing if owner[i] == sid)
        if not resp.deleted:
            raise NotFound(f"ids: none of {list(request.ids)[:5]} exists")
        return resp


def partial_write_error(by_shard: dict[int, shard_pb2.ShardAddRequest], outcomes: Sequence[object], first: BaseException) -> BaseException:
    """The first shard failure of a batch, its message extended by which ids were stored.

    A batch is split by shard; shards that answered stored their ids (idempotent upsert: the
    caller may resend the whole request, or only the ids listed as not stored)."""
    if not isinstance(first, Exception) or status_for(first) is None:
        return first
    stored = [r.id for req, o in zip(by_shard.values(), outcomes) if not isinstance(o, BaseException) for r in req.records]
    lost = [r.id for req, o in zip(by_shard.values(), outcomes) if isinstance(o, BaseException) for r in req.records]
    cap = 50
    msg = (f"{first}; of this batch {len(stored)} images were stored: {stored[:cap]}{' ...' if len(stored) > cap else ''}; "
           f"not confirmed (resend them): {lost[:cap]}{' ...' if len(lost) > cap else ''}")
    err = type(first)(msg)
    if isinstance(first, Overloaded):
        err.retry_after_ms = first.retry_after_ms
    return err
