"""gRPC servicer of one index shard (internal ``loupe.v1.Shard``)."""

from __future__ import annotations

import logging
import threading
import time

import grpc
import numpy as np

from loupe.tensors import from_tensor, to_tensor
from loupe.v1 import shard_pb2, shard_pb2_grpc
from services.common.errors import DataLoss, InvalidArgument, grpc_errors
from services.common.grpc_server import RunningServer, ServerOptions, create_sync_server
from services.extractor.whitening import PCAWhitening
from services.index.records import check_id, record_to_stored, stored_to_features
from services.index.shard_index import ShardIndex
from services.index.wal import WalCorrupt, WriteAheadLog

log = logging.getLogger(__name__)

MAX_TOP_K = 100_000
MAX_LIST_PAGE = 65_536
WAL_ADD, WAL_DELETE, WAL_WHITENING = 1, 2, 3


class ShardServicer(shard_pb2_grpc.ShardServicer):
    """Serves one ``ShardIndex``; every write goes to the WAL (fsync) before it is applied.

    Parameters
    ----------
    shard_id : int
        This shard's id; requests for another id are rejected.
    index : ShardIndex
        The in-memory index (empty or already loaded).
    wal : WriteAheadLog | None
        Durability log, replayed here on start; None keeps the shard in memory only.
    """

    def __init__(self, shard_id: int, index: ShardIndex, wal: WriteAheadLog | None = None) -> None:
        self.shard_id = shard_id
        self.index = index
        self.wal = wal
        self._lock = threading.RLock()
        if wal is not None:
            self._replay(wal)

    def _replay(self, wal: WriteAheadLog) -> None:
        n = 0
        try:
            for kind, payload in wal.replay():
                if kind == WAL_ADD:
                    self._apply_add(shard_pb2.ShardAddRequest.FromString(payload))
                elif kind == WAL_DELETE:
                    self.index.delete(list(shard_pb2.ShardDeleteRequest.FromString(payload).ids))
                elif kind == WAL_WHITENING:
                    self._apply_whitening(shard_pb2.SetWhiteningRequest.FromString(payload))
                n += 1
        except WalCorrupt as exc:
            raise DataLoss(str(exc)) from exc
        if n:
            log.info("shard %d replayed %d WAL entries: %d images", self.shard_id, n, len(self.index))

    def _check_shard(self, shard_id: int) -> None:
        if shard_id != self.shard_id:
            raise InvalidArgument(f"shard_id: request for shard {shard_id} reached shard {self.shard_id}")

    def _apply_add(self, request: shard_pb2.ShardAddRequest) -> int:
        stored = [record_to_stored(r, f"records[{i}]") for i, r in enumerate(request.records)]
        try:
            return self.index.add(stored)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None

    def _apply_whitening(self, request: shard_pb2.SetWhiteningRequest) -> int:
        w = PCAWhitening.from_bytes(request.whitening) if request.whitening else None
        try:
            self.index.set_whitening(w)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        return self.index.indexed_dim

    @grpc_errors
    def Search(self, request: shard_pb2.ShardSearchRequest, context: grpc.ServicerContext) -> shard_pb2.ShardSearchResponse:
        t0 = time.perf_counter()
        self._check_shard(request.shard_id)
        if not 1 <= request.top_k <= MAX_TOP_K:
            raise InvalidArgument(f"top_k: must be in 1..{MAX_TOP_K}, got {request.top_k}")
        query = from_tensor(request.query, field="query")
        with self._lock:
            expected = self.index.indexed_dim if request.query_transformed else self.index.dim
            if query.ndim != 1 or (expected and query.shape[0] != expected):
                raise InvalidArgument(f"query: expected shape [{expected}], got {list(query.shape)}")
            hits = self.index.search(query, request.top_k, request.return_vectors, request.query_transformed)
        resp = shard_pb2.ShardSearchResponse(ids=hits.ids, scores=hits.scores.tolist())
        for md in hits.metadata:
            resp.metadata.add().values.update(md)
        if hits.vectors is not None:
            resp.vectors.CopyFrom(to_tensor(hits.vectors))
        resp.seconds = time.perf_counter() - t0
        return resp

    @grpc_errors
    def Add(self, request: shard_pb2.ShardAddRequest, context: grpc.ServicerContext) -> shard_pb2.ShardAddResponse:
        self._check_shard(request.shard_id)
        # Validate fully before logging so the WAL never holds a record that cannot be applied.
        for i, r in enumerate(request.records):
            record_to_stored(r, f"records[{i}]")
        with self._lock:
            if self.wal is not None:
                self.wal.append(WAL_ADD, request.SerializeToString())
            stored = self._apply_add(request)
            return shard_pb2.ShardAddResponse(stored=stored, total=len(self.index))

    @grpc_errors
    def Delete(self, request: shard_pb2.ShardDeleteRequest, context: grpc.ServicerContext) -> shard_pb2.ShardDeleteResponse:
        self._check_shard(request.shard_id)
        for i, image_id in enumerate(request.ids):
            check_id(image_id, f"ids[{i}]")
        with self._lock:
            present = [i for i in request.ids if i in self.index.label_of]
            if present and self.wal is not None:
                self.wal.append(WAL_DELETE, shard_pb2.ShardDeleteRequest(shard_id=self.shard_id, ids=present).SerializeToString())
            deleted, missing = self.index.delete(list(request.ids))
        return shard_pb2.ShardDeleteResponse(deleted=deleted, missing=missing)

    @grpc_errors
    def GetFeatures(self, request: shard_pb2.GetFeaturesRequest, context: grpc.ServicerContext) -> shard_pb2.GetFeaturesResponse:
        t0 = time.perf_counter()
        self._check_shard(request.shard_id)
        resp = shard_pb2.GetFeaturesResponse()
        with self._lock:
            for image_id in request.ids:
                img = self.index.get(image_id)
                if img is None:
                    continue
                g = self.index.transform(img.vector[None, :])[0] if request.want_global else None
                r = None
                if request.want_regional and img.regional is not None:
                    r = self.index.transform(img.regional.astype(np.float32))
                resp.ids.append(image_id)
                resp.features.append(stored_to_features(img, global_vec=g, regional=r, local=request.want_local))
        resp.seconds = time.perf_counter() - t0
        return resp

    @grpc_errors
    def SampleVectors(self, request: shard_pb2.SampleVectorsRequest, context: grpc.ServicerContext) -> shard_pb2.SampleVectorsResponse:
        self._check_shard(request.shard_id)
        if request.max_vectors < 1:
            raise InvalidArgument(f"max_vectors: must be >= 1, got {request.max_vectors}")
        with self._lock:
            g, r = self.index.sample_vectors(request.max_vectors, request.seed, request.include_regional)
        return shard_pb2.SampleVectorsResponse(vectors=to_tensor(g), regional=to_tensor(r))

    @grpc_errors
    def ListVectors(self, request: shard_pb2.ListVectorsRequest, context: grpc.ServicerContext) -> shard_pb2.ListVectorsResponse:
        self._check_shard(request.shard_id)
        if not 1 <= request.limit <= MAX_LIST_PAGE:
            raise InvalidArgument(f"limit: must be in 1..{MAX_LIST_PAGE}, got {request.limit}")
        if request.cursor < 0:
            raise InvalidArgument(f"cursor: must be >= 0, got {request.cursor}")
        with self._lock:
            page = self.index.list_vectors(request.cursor, request.limit, request.include_regional)
        return shard_pb2.ListVectorsResponse(
            ids=page.ids, vectors=to_tensor(page.vectors), next_cursor=page.next_cursor, done=page.done,
            regional=to_tensor(page.regional), regional_counts=page.regional_counts,
        )

    @grpc_errors
    def SetWhitening(self, request: shard_pb2.SetWhiteningRequest, context: grpc.ServicerContext) -> shard_pb2.SetWhiteningResponse:
        self._check_shard(request.shard_id)
        if request.whitening:
            try:
                PCAWhitening.from_bytes(request.whitening)
            except Exception as exc:  # any parse failure of client bytes is a bad argument
                raise InvalidArgument(f"whitening: cannot be parsed ({exc})") from None
        with self._lock:
            if self.wal is not None:
                self.wal.append(WAL_WHITENING, request.SerializeToString())
            dim = self._apply_whitening(request)
        return shard_pb2.SetWhiteningResponse(dim=dim)

    @grpc_errors
    def Stats(self, request: shard_pb2.ShardStatsRequest, context: grpc.ServicerContext) -> shard_pb2.ShardStatsResponse:
        with self._lock:
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
                wal_bytes=self.wal_bytes(),
            )

    def wal_bytes(self) -> int:
        """Bytes in the write-ahead log (0 without one)."""
        return 0 if self.wal is None else self.wal.size_bytes


def create_server(
    shard_id: int, opts: ServerOptions, *, factory: str = "Flat", wal_path: str | None = None
) -> tuple[RunningServer, ShardServicer]:
    """Start a Shard server; returns the running server (with its port) and the servicer."""
    servicer = ShardServicer(shard_id, ShardIndex(factory), WriteAheadLog(wal_path) if wal_path else None)
    running = create_sync_server(
        lambda s: shard_pb2_grpc.add_ShardServicer_to_server(servicer, s), ["loupe.v1.Shard"], opts
    )
    return running, servicer
