"""gRPC servicer of one index shard (internal ``loupe.v1.Shard``)."""

from __future__ import annotations

import logging
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from loupe.tensors import from_tensor, to_tensor
from loupe.v1 import shard_pb2, shard_pb2_grpc
from services.common.errors import DataLoss, InvalidArgument, grpc_errors, status_for
from services.common.grpc_server import RunningServer, ServerOptions, create_sync_server
from services.common.metrics import ShardMetrics, shard_state
from services.index.metadata_filter import CompiledCondition, compile_filter
from services.index.records import record_to_stored, stored_to_features
from services.index.shard_index import ShardIndex
from services.index.store import ShardStore, StoredImage, StoreCorrupt
from services.index.vector_index import IndexSettings
from services.common import limits
from services.common.limits import check_id
from services.common.local_candidates import (
    CandidateLocal, dequantised, params_from_proto, query_local_features, result_to_proto, side_of, verify_locals,
)
from services.common.message_size import (
    MessageBudget, features_bytes, info_bytes, shard_hit_bytes, vector_row_bytes, verified_candidate_bytes, version_entry_bytes,
)
from services.space.whitening import PCAWhitening

log = logging.getLogger(__name__)

MAX_TOP_K = 100_000
MAX_LIST_PAGE = 65_536
MAX_BATCH_QUERIES = 1024
MAX_RECORDS_PAGE = 10_000  # ListVersions entries, GetRecords ids per call
DEFAULT_MAX_SCAN = 100_000
VERIFY_MARGIN_S = 0.05
"""A Verify call answers this long before its deadline with the candidates verified by then."""
VERIFY_GROUP = 8
"""Candidates verified between two looks at the deadline."""


def stored_candidate(img: StoredImage) -> CandidateLocal | None:
    """A stored image's local features as verification reads them, decoded straight from the
    store: the same arrays as ``candidate_local`` of what ``GetFeatures`` sends, without building
    and parsing that message per candidate."""
    if img.local is None:
        return None
    return CandidateLocal(img.local.keypoints.astype(np.float32), dequantised(img.local.descriptors, img.local.scale),
                          side_of(img.width, img.height))


class ShardServicer(shard_pb2_grpc.ShardServicer):
    """Serves one ``ShardIndex``: a write is durable in the shard's store before it is acknowledged.

    Parameters
    ----------
    shard_id : int
        This shard's id; requests for another id are rejected.
    index : ShardIndex | None
        The shard's collection (store + faiss index), already loaded; None when it could not be
        opened, and then every call fails with ``failure``.
    failure : DataLoss | None
        Why the collection could not be opened (a corrupt store).
    budget : MessageBudget
        The server's message limit: every answer is sized under it from the write limits
        (``services.common.message_size``); a request whose answer could exceed it is refused
        with INVALID_ARGUMENT naming the limit, a page is shortened to fit.
    """

    def __init__(self, shard_id: int, index: ShardIndex | None, failure: DataLoss | None = None, metrics: ShardMetrics | None = None,
                 budget: MessageBudget = MessageBudget()) -> None:
        self.shard_id = shard_id
        self.index = index
        self.failure = failure
        self.metrics = metrics
        self.budget = budget

    def _check_shard(self, shard_id: int) -> None:
        if self.failure is not None:
            raise self.failure
        if shard_id != self.shard_id:
            raise InvalidArgument(f"shard_id: request for shard {shard_id} reached shard {self.shard_id}")


    @staticmethod
    def _valid(fn, *args):
        """Run an index method; its ValueErrors are bad arguments (the message names the field)."""
        try:
            return fn(*args)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None

    @staticmethod
    def _search_args(request: shard_pb2.ShardSearchRequest) -> tuple[np.ndarray, int, bool, bool, list[CompiledCondition] | None]:
        """A search request decoded and validated (InvalidArgument naming the field)."""
        if not 1 <= request.top_k <= MAX_TOP_K:
            raise InvalidArgument(f"top_k: must be in 1..{MAX_TOP_K}, got {request.top_k}")
        query = from_tensor(request.query, field="query")
        if query.ndim != 1:
            raise InvalidArgument(f"query: expected a (D,) vector, got shape {list(query.shape)}")
        conditions = compile_filter(request.filter) if request.filter.all else None
        return query, request.top_k, request.return_vectors, request.query_transformed, conditions

    def _hit_bytes(self, query: shard_pb2.ShardSearchRequest) -> int:
        """Worst-case bytes of one hit of ``query``'s answer (with its vector when asked)."""
        return shard_hit_bytes(self.index.indexed_dim if query.return_vectors else 0)

    @staticmethod
    def _search_response(hits) -> shard_pb2.ShardSearchResponse:
        resp = shard_pb2.ShardSearchResponse(ids=hits.ids, scores=hits.scores.tolist())
        for md in hits.metadata:
            resp.metadata.add().values.update(md)
        if hits.vectors is not None:
            resp.vectors.CopyFrom(to_tensor(hits.vectors))
        return resp

    @grpc_errors
    def Search(self, request: shard_pb2.ShardSearchRequest, context: grpc.ServicerContext) -> shard_pb2.ShardSearchResponse:
        t0 = time.perf_counter()
        self._check_shard(request.shard_id)
        self.budget.check(request.top_k, self._hit_bytes(request), "top_k", "hits")
        hits = self._valid(self.index.search, *self._search_args(request))
        resp = self._search_response(hits)
        resp.seconds = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.search_seconds.labels(self.metrics.shard).observe(resp.seconds)
        return resp

    @grpc_errors
    def SearchBatch(self, request: shard_pb2.ShardSearchBatchRequest, context: grpc.ServicerContext) -> shard_pb2.ShardSearchBatchResponse:
        t0 = time.perf_counter()
        self._check_shard(request.shard_id)
        if len(request.queries) > MAX_BATCH_QUERIES:
            raise InvalidArgument(f"queries: {len(request.queries)} queries, the limit is {MAX_BATCH_QUERIES}")
        hits = sum(max(q.top_k, 0) for q in request.queries)
        need = sum(max(q.top_k, 0) * self._hit_bytes(q) for q in request.queries)
        if need > self.budget.bytes:
            raise InvalidArgument(
                f"queries: {hits} hits in all (sum of top_k) of up to {need // max(hits, 1)} bytes each exceed "
                f"{self.budget.describe()}: split the batch (the broker does)"
            )
        resp = shard_pb2.ShardSearchBatchResponse()
        results = [resp.results.add() for _ in request.queries]
        args, where = [], []
        for i, q in enumerate(request.queries):
            try:
                args.append(self._search_args(q))
                where.append(i)
            except Exception as exc:  # a bad query (InvalidArgument, TensorError) fails alone
                if status_for(exc) != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                results[i].code, results[i].message = grpc.StatusCode.INVALID_ARGUMENT.value[0], str(exc)
        for i, hits in zip(where, self.index.search_many(args) if args else []):
            if isinstance(hits, ValueError):
                results[i].code, results[i].message = grpc.StatusCode.INVALID_ARGUMENT.value[0], str(hits)
            else:
                results[i].response.CopyFrom(self._search_response(hits))
        resp.seconds = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.search_seconds.labels(self.metrics.shard).observe(resp.seconds)
        return resp

    @grpc_errors
    def GetInfo(self, request: shard_pb2.GetInfoRequest, context: grpc.ServicerContext) -> shard_pb2.GetInfoResponse:
        self._check_shard(request.shard_id)
        for i, image_id in enumerate(request.ids):
            check_id(image_id, f"ids[{i}]")
        self.budget.check(len(request.ids), info_bytes(self.index.dim if request.want_vector else 0), "ids", "images")
        resp = shard_pb2.GetInfoResponse()
        for image_id, found in zip(request.ids, self.index.get_infos(list(request.ids), request.want_vector)):
            if found is None:
                resp.missing.append(image_id)
                continue
            info, vector = found
            out = resp.images.add(id=info.image_id, metadata=info.metadata, width=info.width, height=info.height)
            if vector is not None:
                out.vector.CopyFrom(to_tensor(vector.astype(np.float32)))
        return resp

    @grpc_errors
    def ListIds(self, request: shard_pb2.ListIdsRequest, context: grpc.ServicerContext) -> shard_pb2.ListIdsResponse:
        self._check_shard(request.shard_id)
        if not 1 <= request.limit <= MAX_LIST_PAGE:
            raise InvalidArgument(f"limit: must be in 1..{MAX_LIST_PAGE}, got {request.limit}")
        if request.max_scan < 0:
            raise InvalidArgument(f"max_scan: must be >= 0, got {request.max_scan}")
        if request.after:
            check_id(request.after, "after")
        conditions = compile_filter(request.filter) if request.filter.all else None
        limit = min(request.limit, self.budget.items(info_bytes()))  # a shorter page, continued by scanned_to
        max_scan = request.max_scan or DEFAULT_MAX_SCAN
        if conditions is None:
            max_scan = min(max_scan, limit)
        infos, done, last = self.index.list_ids(request.after, limit, conditions, max_scan)
        resp = shard_pb2.ListIdsResponse(done=done, scanned_to="" if done else last)
        for info in infos:
            resp.images.add(id=info.image_id, metadata=info.metadata, width=info.width, height=info.height)
        return resp

    @grpc_errors
    def Add(self, request: shard_pb2.ShardAddRequest, context: grpc.ServicerContext) -> shard_pb2.ShardAddResponse:
        self._check_shard(request.shard_id)
        if len(request.records) > limits.MAX_WRITE_RECORDS:
            raise InvalidArgument(f"records: {len(request.records)} records, the limit is {limits.MAX_WRITE_RECORDS}")
        stored = [record_to_stored(r, f"records[{i}]") for i, r in enumerate(request.records)]
        n = self._valid(self.index.add, stored, [r.version for r in request.records])
        if self.metrics is not None:
            self.metrics.writes.labels(self.metrics.shard, "add").inc(n)
        return shard_pb2.ShardAddResponse(stored=n, total=len(self.index))

    @grpc_errors
    def Delete(self, request: shard_pb2.ShardDeleteRequest, context: grpc.ServicerContext) -> shard_pb2.ShardDeleteResponse:
        self._check_shard(request.shard_id)
        for i, image_id in enumerate(request.ids):
            check_id(image_id, f"ids[{i}]")
        if request.versions and len(request.versions) != len(request.ids):
            raise InvalidArgument(f"versions: {len(request.versions)} versions for {len(request.ids)} ids (one each, or none)")
        deleted, missing = self.index.delete(list(request.ids), list(request.versions) or None)
        if self.metrics is not None:
            self.metrics.writes.labels(self.metrics.shard, "delete").inc(len(deleted))
        return shard_pb2.ShardDeleteResponse(deleted=deleted, missing=missing)

    @grpc_errors
    def GetFeatures(self, request: shard_pb2.GetFeaturesRequest, context: grpc.ServicerContext) -> shard_pb2.GetFeaturesResponse:
        t0 = time.perf_counter()
        self._check_shard(request.shard_id)
        for i, image_id in enumerate(request.ids):
            check_id(image_id, f"ids[{i}]")  # an empty or over-long id is no LMDB key
        per_image = features_bytes(self.index.dim, want_global=request.want_global, want_regional=request.want_regional,
                                   want_local=request.want_local)
        self.budget.check(len(request.ids), per_image, "ids", "images")
        resp = shard_pb2.GetFeaturesResponse()
        for image_id in request.ids:
            img = self.index.get(image_id, regional=request.want_regional, local=request.want_local)
            if img is None:
                continue
            g = None
            if request.want_global:
                g = img.vector if request.want_raw_global else self.index.transform(img.vector[None, :])[0]
            r = None
            if request.want_regional and img.regional is not None:
                r = self.index.transform(img.regional.astype(np.float32))
            resp.ids.append(image_id)
            resp.features.append(stored_to_features(img, global_vec=g, regional=r, local=request.want_local))
        resp.seconds = time.perf_counter() - t0
        return resp

    @grpc_errors
    def Verify(self, request: shard_pb2.ShardVerifyRequest, context: grpc.ServicerContext) -> shard_pb2.ShardVerifyResponse:
        t0 = time.perf_counter()
        self._check_shard(request.shard_id)
        if len(request.ids) > limits.MAX_VERIFY_IDS:
            raise InvalidArgument(f"ids: {len(request.ids)} candidates, the limit is {limits.MAX_VERIFY_IDS}")
        for i, image_id in enumerate(request.ids):
            check_id(image_id, f"ids[{i}]")
        self.budget.check(len(request.ids), verified_candidate_bytes(), "ids", "candidates")
        query = query_local_features(request.query, "query")
        params = params_from_proto(request.params)
        # stop shortly before the caller gives up and answer with what is verified by then
        remaining = context.time_remaining() if context is not None else None
        stop_at = None if remaining is None else time.perf_counter() + max(0.0, min(remaining, request.timeout_s or remaining) - VERIFY_MARGIN_S)
        resp = shard_pb2.ShardVerifyResponse()
        spent = 0.0
        todo: list[tuple[str, CandidateLocal]] = []
        for image_id in request.ids:
            img = self.index.get(image_id, regional=False, local=True)
            candidate = stored_candidate(img) if img is not None else None
            if candidate is None:
                continue
            if candidate.descriptors.shape[1] != query[1].shape[1]:
                raise InvalidArgument(
                    f"query.descriptors: {query[1].shape[1]} columns, the stored local features have {candidate.descriptors.shape[1]}"
                )
            todo.append((image_id, candidate))
        for start in range(0, len(todo), VERIFY_GROUP):
            group = todo[start : start + VERIFY_GROUP]
            if stop_at is not None and time.perf_counter() >= stop_at:
                resp.unverified.extend(image_id for image_id, _ in group)
                continue
            t1 = time.perf_counter()
            results = verify_locals(query, [c for _, c in group], params)
            spent += time.perf_counter() - t1
            resp.results.extend(result_to_proto(image_id, r, c) for (image_id, c), r in zip(group, results))
        resp.verify_seconds = spent
        resp.seconds = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.verify_seconds.labels(self.metrics.shard).observe(resp.seconds)
        return resp

    @grpc_errors
    def SampleVectors(self, request: shard_pb2.SampleVectorsRequest, context: grpc.ServicerContext) -> shard_pb2.SampleVectorsResponse:
        self._check_shard(request.shard_id)
        if request.max_vectors < 1:
            raise InvalidArgument(f"max_vectors: must be >= 1, got {request.max_vectors}")
        g, r = self.index.sample_vectors(request.max_vectors, request.seed, request.include_regional)
        return shard_pb2.SampleVectorsResponse(vectors=to_tensor(g), regional=to_tensor(r))

    @grpc_errors
    def ListVectors(self, request: shard_pb2.ListVectorsRequest, context: grpc.ServicerContext) -> shard_pb2.ListVectorsResponse:
        self._check_shard(request.shard_id)
        if not 1 <= request.limit <= MAX_LIST_PAGE:
            raise InvalidArgument(f"limit: must be in 1..{MAX_LIST_PAGE}, got {request.limit}")
        if request.cursor < 0:
            raise InvalidArgument(f"cursor: must be >= 0, got {request.cursor}")
        limit = min(request.limit, self.budget.items(vector_row_bytes(self.index.indexed_dim, request.include_regional)))
        page = self.index.list_vectors(request.cursor, limit, request.include_regional)
        return shard_pb2.ListVectorsResponse(
            ids=page.ids, vectors=to_tensor(page.vectors), next_cursor=page.next_cursor, done=page.done,
            regional=to_tensor(page.regional), regional_counts=page.regional_counts,
        )

    @grpc_errors
    def SetWhitening(self, request: shard_pb2.SetWhiteningRequest, context: grpc.ServicerContext) -> shard_pb2.SetWhiteningResponse:
        self._check_shard(request.shard_id)
        w = None
        if request.whitening:
            try:
                w = PCAWhitening.from_bytes(request.whitening)
            except Exception as exc:  # any parse failure of client bytes is a bad argument
                raise InvalidArgument(f"whitening: cannot be parsed ({exc})") from None
        self._valid(self.index.set_whitening, w)
        return shard_pb2.SetWhiteningResponse(dim=self.index.indexed_dim)

    @grpc_errors
    def Stats(self, request: shard_pb2.ShardStatsRequest, context: grpc.ServicerContext) -> shard_pb2.ShardStatsResponse:
        if self.failure is not None:
            raise self.failure
        s = self.index.stats()
        return shard_pb2.ShardStatsResponse(
            shard_id=self.shard_id,
            images=s["images"],
            regional_vectors=s["regional_vectors"],
            local_features=s["local_features"],
            feature_bytes=s["feature_bytes"],
            dim=self.index.indexed_dim,
            index=self.index.factory,
            whitened=self.index.whitening is not None,
            store_bytes=s["store_bytes"],
            index_bytes=s["index_bytes"],
            startup_seconds=self.index.startup.seconds,
            startup_replayed=self.index.startup.replayed,
            sequence=s["sequence"],
            snapshot_sequence=self.index.snapshot_sequence,
            oversized_records=s["oversized"],
            max_version=s["max_version"],
            digest=s["digest"],
            tombstones=s["tombstones"],
            store_id=self.index.store.store_id,
            whitening_crc=self.index.whitening_crc(),
        )

    @grpc_errors
    def ListVersions(self, request: shard_pb2.ListVersionsRequest, context: grpc.ServicerContext) -> shard_pb2.ListVersionsResponse:
        self._check_shard(request.shard_id)
        if not 1 <= request.limit <= MAX_RECORDS_PAGE:
            raise InvalidArgument(f"limit: must be in 1..{MAX_RECORDS_PAGE}, got {request.limit}")
        if request.after:
            check_id(request.after, "after")
        if request.upto:
            check_id(request.upto, "upto")
        limit = min(request.limit, self.budget.items(version_entry_bytes()))
        entries, done = self.index.store.versions_after(request.after, limit, request.upto or None)
        return shard_pb2.ListVersionsResponse(
            ids=[e.image_id for e in entries], versions=[e.version for e in entries], deleted=[e.deleted for e in entries], done=done,
        )

    @grpc_errors
    def GetRecords(self, request: shard_pb2.GetRecordsRequest, context: grpc.ServicerContext) -> shard_pb2.GetRecordsResponse:
        self._check_shard(request.shard_id)
        if len(request.ids) > MAX_RECORDS_PAGE:
            raise InvalidArgument(f"ids: {len(request.ids)} ids, the limit is {MAX_RECORDS_PAGE} per call")
        for i, image_id in enumerate(request.ids):
            check_id(image_id, f"ids[{i}]")  # an empty or over-long id is no LMDB key (found by the internal-port fuzzer)
        resp = shard_pb2.GetRecordsResponse()
        size = 0
        for image_id in request.ids:
            entry = self.index.store.versions_of([image_id])[0]
            img = self.index.get(image_id)
            # the version read again after the record: a write in between would pair an old
            # record with a newer version (the copy would then win over that newer write)
            if img is not None and entry is not None and not entry.deleted and self.index.store.versions_of([image_id])[0] == entry:
                rec = shard_pb2.ShardRecord(
                    id=image_id, features=stored_to_features(img, global_vec=img.vector, regional=img.regional, local=True),
                    metadata=img.metadata, version=entry.version,
                )
                n = rec.ByteSize() + 8
                if resp.records and size + n > self.budget.bytes:
                    break  # the rest in the next call
                resp.records.append(rec)
                size += n
            resp.consumed += 1
        return resp


def create_server(
    shard_id: int, opts: ServerOptions, *, data_dir: str, settings: IndexSettings = IndexSettings(), metrics: ShardMetrics | None = None
) -> tuple[RunningServer, ShardServicer]:
    """Start a Shard server over the collection in ``data_dir``; returns the running server
    (with its port) and the servicer. ``metrics`` (optional) records searches, writes, commit
    latency and, at every scrape, what the shard holds.

    A corrupt store does not crash the process (a restart loop would hide it): the server
    starts NOT_SERVING and answers every call DATA_LOSS with the reason, which the log repeats.
    """
    budget = MessageBudget(opts.max_message_bytes)
    try:
        store = ShardStore(data_dir)
        if metrics is not None:
            commits = metrics.commit_seconds.labels(metrics.shard)
            store.on_commit = commits.observe
        servicer = ShardServicer(shard_id, ShardIndex(store, settings), metrics=metrics, budget=budget)
    except StoreCorrupt as exc:
        log.error("shard %d: store at %s is corrupt, serving DATA_LOSS: %s", shard_id, data_dir, exc)
        servicer = ShardServicer(shard_id, None, DataLoss(f"shard {shard_id}: store is corrupt: {exc}"), metrics=metrics, budget=budget)
    if metrics is not None:
        metrics.watch(lambda: shard_state(servicer.index) if servicer.index is not None and not servicer.index._closed else None)
    running = create_sync_server(
        lambda s: shard_pb2_grpc.add_ShardServicer_to_server(servicer, s), ["loupe.v1.Shard"], opts
    )
    if servicer.failure is not None:
        running.health.set("loupe.v1.Shard", health_pb2.HealthCheckResponse.NOT_SERVING)
        running.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    return running, servicer
