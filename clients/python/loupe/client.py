"""A thin Python client of the public ``loupe.v1.Retrieval`` service."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import grpc
import json
import numpy as np

from loupe.tensors import to_tensor
from loupe.v1 import retrieval_pb2, retrieval_pb2_grpc, types_pb2

MiB = 1024 * 1024

# Retries with jittered exponential backoff (gRPC retry design A6: each wait is random in
# [0, min(initial * multiplier**n, max)]) on the transient codes only. INVALID_ARGUMENT and the
# other caller errors are never retried; a RESOURCE_EXHAUSTED for an input over a limit carries
# the "grpc-retry-pushback-ms: -1" trailer, which stops the retries, while an overloaded
# broker's carries its hint (e.g. 100 ms), which gRPC waits before the next attempt.
RETRY_SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": "loupe.v1.Retrieval"}],
        "retryPolicy": {
            "maxAttempts": 4,
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
        },
    }]
})


@dataclass(frozen=True)
class ImageToAdd:
    """One image for ``add_images``: id, encoded bytes, optional metadata."""

    image_id: str
    data: bytes
    metadata: dict[str, str] | None = None


class RetrievalClient:
    """Blocking client; use as a context manager or call ``close()``.

    Parameters
    ----------
    address : str
        host:port of a broker.
    max_message_bytes : int
        Largest message sent or received (images can be large).
    token : str or None
        Bearer token sent with every call (the broker's ``--auth-tokens-file``); None = none.
        ``loupe.client.token_from_env()`` reads ``LOUPE_TOKEN`` / ``LOUPE_TOKEN_FILE``.
    tls_ca_file : str or None
        PEM CA bundle that signed the broker's certificate → TLS. None = plaintext, unless ``tls``.
    tls : bool
        TLS with the system's root certificates (implied by ``tls_ca_file``).
    retries : bool
        Retry UNAVAILABLE / RESOURCE_EXHAUSTED with jittered backoff (``RETRY_SERVICE_CONFIG``).
        Every rpc is safe to retry: AddImages is an idempotent upsert by id.

    Attributes
    ----------
    stub : RetrievalStub
        The raw stub; pass ``metadata=client.metadata`` when calling it directly.
    metadata : tuple
        Call metadata carrying the token (empty without one).
    """

    def __init__(
        self, address: str, max_message_bytes: int = 64 * MiB, *, token: str | None = None, tls_ca_file: str | None = None, tls: bool = False,
        retries: bool = True,
    ) -> None:
        self.address = address
        options: list[tuple[str, int | str]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.enable_retries", 1 if retries else 0),
        ]
        if retries:
            options.append(("grpc.service_config", RETRY_SERVICE_CONFIG))
        if tls_ca_file or tls:
            roots = None
            if tls_ca_file:
                with open(tls_ca_file, "rb") as f:
                    roots = f.read()
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=roots), options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        # sent as call metadata (not call credentials, which gRPC refuses on plaintext channels)
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self.stub = retrieval_pb2_grpc.RetrievalStub(self._channel)

    def __enter__(self) -> "RetrievalClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until the channel connects (raises grpc.FutureTimeoutError)."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout_s)

    def search(
        self,
        *,
        image: bytes | None = None,
        vector: np.ndarray | None = None,
        k: int = 10,
        offset: int = 0,
        crop: Sequence[float] | None = None,
        rerank: retrieval_pb2.RerankOptions | None = None,
        return_matches: bool = False,
        timeout_s: float | None = 30.0,
        image_id: str | None = None,
        include_query: bool = False,
        filter: types_pb2.Filter | Sequence[str] | None = None,
    ) -> retrieval_pb2.SearchResponse:
        """Search by encoded image bytes, a (D,) raw descriptor or the id of an indexed image
        (``image_id``: "more like this"; the image itself is left out unless ``include_query``);
        ``crop`` = (x1, y1, x2, y2); ``filter``: a Filter or ``parse_filter`` specs."""
        req = search_request(image=image, vector=vector, image_id=image_id, k=k, offset=offset, crop=crop, rerank=rerank,
                             return_matches=return_matches, include_query=include_query, filter=filter)
        return self.stub.Search(req, timeout=timeout_s, metadata=self.metadata)

    def search_batch(self, queries: Sequence[retrieval_pb2.SearchRequest], timeout_s: float | None = 60.0) -> retrieval_pb2.SearchBatchResponse:
        """Many searches in one call (build each with ``search_request``); answers in order, each
        with its own ``status`` (code 0 = OK)."""
        return self.stub.SearchBatch(retrieval_pb2.SearchBatchRequest(queries=list(queries)), timeout=timeout_s, metadata=self.metadata)

    def get_images(self, ids: Sequence[str], with_vector: bool = False, timeout_s: float = 30.0) -> retrieval_pb2.GetImagesResponse:
        """Stored records of ``ids`` (unknown ids in ``missing``); ``with_vector`` adds each global descriptor."""
        return self.stub.GetImages(retrieval_pb2.GetImagesRequest(ids=list(ids), with_vector=with_vector), timeout=timeout_s, metadata=self.metadata)

    def list_images(self, page_size: int = 0, cursor: str = "", filter: types_pb2.Filter | Sequence[str] | None = None,
                    timeout_s: float = 30.0) -> retrieval_pb2.ListImagesResponse:
        """One page of the collection in id order; pass its ``next_cursor`` back for the next ("" = done)."""
        req = retrieval_pb2.ListImagesRequest(page_size=page_size, cursor=cursor, filter=_as_filter(filter))
        return self.stub.ListImages(req, timeout=timeout_s, metadata=self.metadata)

    def iter_images(self, page_size: int = 0, filter: types_pb2.Filter | Sequence[str] | None = None,
                    timeout_s: float = 30.0) -> Iterator[retrieval_pb2.StoredImage]:
        """Every stored image (matching ``filter``), page by page."""
        cursor = ""
        while True:
            page = self.list_images(page_size, cursor, filter, timeout_s)
            yield from page.images
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def add_images(
        self, images: Iterable[ImageToAdd], batch_size: int = 16, timeout_s: float | None = None
    ) -> retrieval_pb2.AddImagesResponse:
        """Stream images in batches; returns once all are stored."""

        def batches() -> Iterator[retrieval_pb2.AddImagesRequest]:
            batch = retrieval_pb2.AddImagesRequest()
            for img in images:
                batch.images.add(id=img.image_id, image=img.data, metadata=img.metadata or {})
                if len(batch.images) >= batch_size:
                    yield batch
                    batch = retrieval_pb2.AddImagesRequest()
            if batch.images:
                yield batch

        return self.stub.AddImages(batches(), timeout=timeout_s, metadata=self.metadata)

    def delete(self, ids: Sequence[str], timeout_s: float = 30.0) -> retrieval_pb2.DeleteResponse:
        """Delete ids (NOT_FOUND when none exists)."""
        return self.stub.Delete(retrieval_pb2.DeleteRequest(ids=list(ids)), timeout=timeout_s, metadata=self.metadata)

    def stats(self, timeout_s: float = 30.0) -> retrieval_pb2.GetStatsResponse:
        """Collection statistics."""
        return self.stub.GetStats(retrieval_pb2.GetStatsRequest(), timeout=timeout_s, metadata=self.metadata)

    def build_graph(self, k: int = 0, remove: bool = False, timeout_s: float = 600.0) -> retrieval_pb2.BuildGraphResponse:
        """Build (or remove) the collection's kNN graph used by global diffusion."""
        return self.stub.BuildGraph(retrieval_pb2.BuildGraphRequest(k=k, remove=remove), timeout=timeout_s, metadata=self.metadata)

    def fit_whitening(self, max_vectors: int = 0, dim: int = 0, remove: bool = False, pairs: Sequence[tuple[str, str]] = (),
                      timeout_s: float = 300.0) -> retrieval_pb2.FitWhiteningResponse:
        """Learn and install the collection's whitening (or remove it): PCA-whitening, or with
        ``pairs`` of image ids that show the same object, the learned whitening from them."""
        req = retrieval_pb2.FitWhiteningRequest(max_vectors=max_vectors, dim=dim, remove=remove,
                                                pairs=[retrieval_pb2.ImagePair(a=a, b=b) for a, b in pairs])
        return self.stub.FitWhitening(req, timeout=timeout_s, metadata=self.metadata)

    def backup(self, url: str, full: bool = False, timeout_s: float | None = 24 * 3600.0) -> retrieval_pb2.BackupResponse:
        """Back the collection up to ``url`` (an absolute directory path on the broker's machine, or
        s3://bucket/prefix); incremental unless ``full``."""
        return self.stub.Backup(retrieval_pb2.BackupRequest(url=url, full=full), timeout=timeout_s, metadata=self.metadata)

    def list_backups(self, url: str, timeout_s: float = 120.0) -> retrieval_pb2.ListBackupsResponse:
        """The backups at ``url``, oldest first."""
        return self.stub.ListBackups(retrieval_pb2.ListBackupsRequest(url=url), timeout=timeout_s, metadata=self.metadata)

    def restore(self, url: str, backup_id: str = "", timeout_s: float | None = 24 * 3600.0) -> retrieval_pb2.RestoreResponse:
        """Restore backup ``backup_id`` ("" = the newest) at ``url`` into this (empty) cluster."""
        return self.stub.Restore(retrieval_pb2.RestoreRequest(url=url, backup_id=backup_id), timeout=timeout_s, metadata=self.metadata)

    def reshard(self, shards: int, timeout_s: float | None = 24 * 3600.0) -> retrieval_pb2.ReshardResponse:
        """Move the collection to ``shards`` shards while it serves (records move, nothing is re-extracted)."""
        return self.stub.Reshard(retrieval_pb2.ReshardRequest(shards=shards), timeout=timeout_s, metadata=self.metadata)


def search_request(
    *, image: bytes | None = None, vector: np.ndarray | None = None, image_id: str | None = None, k: int = 10, offset: int = 0,
    crop: Sequence[float] | None = None, rerank: retrieval_pb2.RerankOptions | None = None, return_matches: bool = False,
    include_query: bool = False, filter: types_pb2.Filter | Sequence[str] | None = None,
) -> retrieval_pb2.SearchRequest:
    """A SearchRequest (for ``search`` or one query of ``search_batch``)."""
    req = retrieval_pb2.SearchRequest(k=k, offset=offset, return_matches=return_matches, include_query=include_query)
    if image is not None:
        req.image = image
    if vector is not None:
        req.vector.CopyFrom(to_tensor(np.asarray(vector, dtype=np.float32)))
    if image_id is not None:
        req.id = image_id
    if crop is not None:
        req.crop.CopyFrom(types_pb2.Box(x1=crop[0], y1=crop[1], x2=crop[2], y2=crop[3]))
    if rerank is not None:
        req.rerank.CopyFrom(rerank)
    if filter is not None:
        req.filter.CopyFrom(_as_filter(filter))
    return req


_RANGE_OPS = (">=", "<=", ">", "<")


def parse_filter(specs: Sequence[str]) -> types_pb2.Filter:
    """``["customer=acme", "colour=red|blue", "year>=2020", "taken<2021-06-01"]`` → a Filter (AND).

    ``key=value``: equality; ``key=a|b|c``: one of the values; ``key>=x``, ``key>x``, ``key<=x``,
    ``key<x``: numeric/date range (two conditions on one key make a closed range). Raises
    ValueError naming the spec that does not parse.
    """
    flt = types_pb2.Filter()
    ranges: dict[str, types_pb2.Range] = {}
    for spec in specs:
        for op in _RANGE_OPS:
            key, sep, value = spec.partition(op)
            if sep and key and "=" not in key and (op not in (">", "<") or not value.startswith("=")):
                r = ranges.setdefault(key.strip(), types_pb2.Range())
                if op[0] == ">":
                    r.min, r.min_exclusive = value.strip(), op == ">"
                else:
                    r.max, r.max_exclusive = value.strip(), op == "<"
                break
        else:
            key, sep, value = spec.partition("=")
            if not sep or not key:
                raise ValueError(f"filter {spec!r}: expected key=value, key=a|b, key>=x, key>x, key<=x or key<x")
            values = value.split("|")
            if len(values) > 1:
                flt.all.add(key=key, any_of=types_pb2.ValueSet(values=values))
            else:
                flt.all.add(key=key, equals=value)
    for key, r in ranges.items():
        flt.all.add(key=key, range=r)
    return flt


def _as_filter(filter: types_pb2.Filter | Sequence[str] | None) -> types_pb2.Filter | None:
    if filter is None or isinstance(filter, types_pb2.Filter):
        return filter
    return parse_filter(filter)


def token_from_env(token_file: str | None = None) -> str | None:
    """A client token: ``token_file``, else env ``LOUPE_TOKEN``, else the file named by ``LOUPE_TOKEN_FILE``.

    Returns None when none is set. Tokens are never taken from command-line arguments.
    """
    import os

    path = token_file or ""
    if not path:
        if os.environ.get("LOUPE_TOKEN", "").strip():
            return os.environ["LOUPE_TOKEN"].strip()
        path = os.environ.get("LOUPE_TOKEN_FILE", "")
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"token file {path}: empty")
    return token
