"""One shard's collection: durable records in the store, global vectors in a faiss index.

Records live on disk (``ShardStore``); RAM holds the faiss index (exact flat vectors while the
shard is small, compressed codes once it is large) and nothing per image in Python. A write is
durable in the store before the faiss index sees it; the index is snapshotted with the store's
sequence number, so a restart loads the snapshot and replays only the changes after it.

Thread-safety: searches and other reads share a read-write lock, writes take it alone; the
approximate index's training and snapshot writing run on a background thread and take it only
to copy and swap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import zlib
from dataclasses import dataclass, replace
from typing import Iterator

import faiss
import numpy as np

from services.common import limits
from services.common.errors import InvalidArgument
from services.index.metadata_filter import CompiledCondition, MetadataIndex
from services.index.store import OP_ADD, ImageInfo, ShardStore, StoredImage, above_limits
from services.index.vector_index import (
    ApproxIndex,
    ExactIndex,
    IndexSettings,
    SnapshotCorrupt,
    read_snapshot,
    serialize,
    write_blob,
)
from services.space.ann import ivfpq_factory
from services.space.whitening import PCAWhitening, to_indexed_space

log = logging.getLogger(__name__)
SNAPSHOT_FILE = "index.faiss"


class ReadWriteLock:
    """Many readers or one writer; a waiting writer holds new readers back. Not reentrant."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class SearchHits:
    """Top results of one query: ids, scores (D-dimensional inner products), whitened vectors."""

    ids: list[str]
    scores: np.ndarray  # (n,) float32
    vectors: np.ndarray | None  # (n, D') float32
    metadata: list[dict[str, str]]


@dataclass(frozen=True)
class VectorPage:
    """A page of :meth:`ShardIndex.list_vectors`."""

    ids: list[str]
    vectors: np.ndarray  # (n, D') as indexed
    next_cursor: int
    done: bool
    regional: np.ndarray  # (m, D') as indexed, images in order
    regional_counts: list[int]  # (n,) regional vectors per image


@dataclass(frozen=True)
class StartupReport:
    """How the index came back at start: snapshot loaded or rebuilt, changes replayed, seconds."""

    source: str  # "empty", "snapshot" or "rebuilt"
    replayed: int
    seconds: float
    reason: str = ""


class ShardIndex:
    """A shard's images, searchable by global-descriptor inner product.

    Parameters
    ----------
    store : ShardStore
        The shard's durable records (opened; the index takes ownership and closes it).
    settings : IndexSettings
        Exact/approximate policy, shortlist, snapshot cadence.
    background : bool
        Train the approximate index and write snapshots on a background thread (False runs
        them inline: deterministic tests and benchmarks).
    """

    def __init__(self, store: ShardStore, settings: IndexSettings = IndexSettings(), background: bool = True) -> None:
        self.store = store
        self.settings = settings
        self.background = background
        self._lock = ReadWriteLock()
        self._worker: threading.Thread | None = None
        self._building = False
        self._closed = False
        raw_w = store.setting("whitening")
        self.whitening: PCAWhitening | None = PCAWhitening.from_bytes(raw_w) if raw_w else None
        raw_d = store.setting("dim")
        self.dim = int(raw_d) if raw_d else 0
        self._faiss: ExactIndex | ApproxIndex | None = None
        self._last_snapshot_seq = 0
        self._snapshot_compacted = store.compacted  # the store shrank at open: rewrite the snapshot too
        self._meta: MetadataIndex | None = None  # built on the first filtered call
        self._withheld_logged: set[str] = set()  # ids whose oversized parts were already logged
        self.startup = self._load()
        self._maybe_maintain()

    # --- start-up ---------------------------------------------------------------------
    def whitening_crc(self) -> int:
        """CRC32 of the installed whitening (0 = none)."""
        raw = self.store.setting("whitening")
        return zlib.crc32(raw) if raw else 0

    def _load(self) -> StartupReport:
        t0 = time.perf_counter()
        record = self.store.read_snapshot_record()
        reason = ""
        if record is not None:
            if record.get("whitening_crc32") != self.whitening_crc() or record.get("dim") != self.indexed_dim:
                reason = "snapshot predates the current whitening"
            else:
                try:
                    index = read_snapshot(self.store.path, record)
                    self._faiss = self._wrap(index, record["kind"], record.get("factory", ""), record.get("trained_for", 0))
                    replayed = self._replay(record["seq"])
                    self._last_snapshot_seq = record["seq"]
                    report = StartupReport("snapshot", replayed, time.perf_counter() - t0)
                    log.info("shard store %s: snapshot at seq %d loaded, %d changes replayed (%.2f s)",
                             self.store.path, record["seq"], replayed, report.seconds)
                    return report
                except SnapshotCorrupt as exc:
                    reason = str(exc)
            log.warning("shard store %s: snapshot not usable (%s): rebuilding the index from the store", self.store.path, reason)
        self._rebuild()
        n = self._faiss.ntotal if self._faiss is not None else 0
        source = "rebuilt" if n or record is not None else "empty"
        return StartupReport(source, n, time.perf_counter() - t0, reason)

    def _wrap(self, index: faiss.Index, kind: str, factory: str, trained_for: int) -> ExactIndex | ApproxIndex:
        if kind == ExactIndex.kind:
            return ExactIndex(index.d, index)
        return ApproxIndex(index, self.settings.shortlist, self.settings.nprobe, factory, trained_for)

    def _replay(self, seq: int) -> int:
        """Apply the store's changes after ``seq`` to the faiss index; returns how many there were."""
        changes = self.store.changes_after(seq)
        self._apply_changes(changes, self._faiss)
        return len(changes)

    def _apply_changes(self, changes: list[tuple[int, int, int]], index: ExactIndex | ApproxIndex) -> None:
        """Apply (seq, op, label) changes to ``index``. Labels are never reused, so they
        coalesce: an image added and deleted within the window never reaches the index, and the
        rest are applied in batches."""
        added = {label for _, op, label in changes if op == OP_ADD}
        removed = [label for _, op, label in changes if op != OP_ADD and label not in added]
        index.remove(np.asarray(removed, np.int64))
        live = sorted(self.store.labels_existing(sorted(added)))
        for start in range(0, len(live), 4096):
            chunk = live[start : start + 4096]
            index.add(np.asarray(chunk, np.int64), self.transform(self.store.vectors(chunk, self.dim)))

    def _rebuild(self) -> None:
        """Re-create the exact index from every stored vector (the approximate one follows in
        the background when the shard is large enough)."""
        if self.dim == 0:
            self._faiss = None
            return
        index = ExactIndex(self.indexed_dim)
        for labels, vecs in self.store.iter_vectors(self.dim):
            index.add(labels, self.transform(vecs))
        self._faiss = index

    # --- transforms -------------------------------------------------------------------
    def transform(self, raw: np.ndarray) -> np.ndarray:
        """(n, D) raw L2-normalised vectors → (n, D') vectors as indexed (whitened, L2)."""
        return to_indexed_space(raw, self.whitening)

    @property
    def indexed_dim(self) -> int:
        """Dimension of vectors in the faiss index (0 while empty)."""
        if self.dim == 0:
            return 0
        return self.whitening.output_dim if self.whitening is not None else self.dim

    @property
    def factory(self) -> str:
        """What searches run on now: "Flat" or the approximate index's factory string."""
        if isinstance(self._faiss, ApproxIndex):
            return self._faiss.factory or "approximate"
        return "Flat"

    def set_whitening(self, whitening: PCAWhitening | None) -> None:
        """Install (or remove) the collection whitening and re-index every stored vector."""
        with self._lock.write():
            if whitening is not None and self.dim and whitening.input_dim != self.dim:
                raise ValueError(f"whitening: input dimension {whitening.input_dim} != stored dimension {self.dim}")
            self.store.put_setting("whitening", whitening.to_bytes() if whitening is not None else None)
            self.whitening = whitening
            self._rebuild()
        self._maybe_maintain()

    # --- writes -----------------------------------------------------------------------
    def add(self, records: list[StoredImage], versions: list[int] | None = None) -> int:
        """Store or replace images durably, then index them; returns how many were stored.

        ``versions`` (one per record, 0 = the store's next): a record older than the id's last
        write here is skipped (replication: last writer wins, ``ShardStore.put``)."""
        with self._lock.write():
            # an empty shard takes the whitening's input dimension, else its first record's
            first = records[0].vector.shape[0] if records and records[0].vector.ndim == 1 else 0
            expected = self.dim or (self.whitening.input_dim if self.whitening is not None else first)
            for rec in records:
                if rec.vector.ndim != 1:
                    raise ValueError(f"features.global of {rec.image_id!r}: expected a (D,) vector")
                if rec.vector.shape[0] != expected:
                    raise ValueError(
                        f"features.global of {rec.image_id!r}: dimension {rec.vector.shape[0]} != index dimension {expected}"
                    )
            if not records:
                return 0
            if self.dim == 0:
                self.store.put_setting("dim", str(records[0].vector.shape[0]).encode())
                self.dim = int(records[0].vector.shape[0])
            old = self.store.id_infos([r.image_id for r in records]) if self._meta is not None else []
            result = self.store.put(records, versions)
            applied = [records[i] for i in result.applied]
            if self._meta is not None:
                for i in result.applied:
                    found = old[i]
                    if found is not None and found[0] in result.replaced:
                        self._meta.remove(found[0], found[1].metadata)
                last = {rec.image_id: (label, rec) for label, rec in zip(result.labels, applied)}  # an id twice in one write: the last wins
                for label, rec in last.values():
                    self._meta.add(label, rec.metadata)
            if self._faiss is None:
                self._faiss = ExactIndex(self.indexed_dim)
            self._faiss.remove(np.asarray(result.replaced, np.int64))
            if applied:
                self._faiss.add(np.asarray(result.labels, np.int64), self.transform(np.stack([r.vector for r in applied])))
        self._maybe_maintain()
        return len(records)

    def delete(self, ids: list[str], versions: list[int] | None = None) -> tuple[list[str], list[str]]:
        """Remove ids durably (tombstones of ``versions``, see ``ShardStore.delete``); returns (deleted, missing)."""
        with self._lock.write():
            old = self.store.id_infos(ids) if self._meta is not None else []
            deleted, missing, labels, _ = self.store.delete(ids, versions)
            if self._meta is not None:
                for found in old:
                    if found is not None and found[0] in labels:
                        self._meta.remove(found[0], found[1].metadata)
            if self._faiss is not None:
                self._faiss.remove(np.asarray(labels, np.int64))
        self._maybe_maintain()
        return deleted, missing

    # --- reads ------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.store.counters()["images"]

    def _indexed_vectors(self, labels: np.ndarray) -> np.ndarray:
        return self.transform(self.store.vectors([int(l) for l in labels], self.dim))

    def search(self, query: np.ndarray, top_k: int, return_vectors: bool = False, transformed: bool = False,
               conditions: list[CompiledCondition] | None = None) -> SearchHits:
        """Top-k images for one (D,) raw query vector (or (D',) when ``transformed``), by inner
        product; with ``conditions``, only among the images whose metadata satisfies them."""
        return self.search_many([(query, top_k, return_vectors, transformed, conditions)])[0]

    def search_many(
        self, queries: list[tuple[np.ndarray, int, bool, bool, list[CompiledCondition] | None]]
    ) -> list[SearchHits | ValueError]:
        """Several searches under one read lock: (query, top_k, return_vectors, transformed,
        conditions) each; unfiltered queries of the exact index share one faiss search. A query
        that is wrong (dimension) yields its ValueError in its place (raised when alone)."""
        if any(c for *_, c in queries):
            self._ensure_metadata_index()
        out: list[SearchHits | ValueError | None] = [None] * len(queries)
        with self._lock.read():
            prepared: list[tuple[int, np.ndarray]] = []
            for i, (query, top_k, _, transformed, _c) in enumerate(queries):
                query = np.asarray(query, dtype=np.float32).reshape(-1)
                expected = self.indexed_dim if transformed else self.dim
                if expected and query.shape[0] != expected:
                    out[i] = ValueError(f"query: dimension {query.shape[0]} != index dimension {expected}")
                    continue
                if self._faiss is None or self._faiss.ntotal == 0:
                    out[i] = SearchHits([], np.zeros(0, np.float32), None, [])
                    continue
                prepared.append((i, (to_indexed_space(query, None) if transformed else self.transform(query))[0]))
            shared = [(i, q) for i, q in prepared if not queries[i][4] and isinstance(self._faiss, ExactIndex)]
            if len(shared) > 1:
                k = max(queries[i][1] for i, _ in shared)
                labels, scores = self._faiss.search_many(np.stack([q for _, q in shared]), k)
                for row, (i, _) in enumerate(shared):
                    keep = labels[row] >= 0
                    n = queries[i][1]
                    out[i] = self._hits(labels[row][keep][:n], scores[row][keep][:n], None, queries[i][2])
            for i, q in prepared:
                if out[i] is not None:
                    continue
                _, top_k, return_vectors, _, conditions = queries[i]
                if conditions:
                    labels, scores, vectors = self._filtered_search(q, top_k, self._meta.match(conditions))
                else:
                    labels, scores, vectors = self._faiss.search(q, top_k, self._indexed_vectors)
                out[i] = self._hits(labels, scores, vectors, return_vectors)
        if len(out) == 1 and isinstance(out[0], ValueError):
            raise out[0]
        return out  # type: ignore[return-value]

    def _hits(self, labels: np.ndarray, scores: np.ndarray, vectors: np.ndarray | None, return_vectors: bool) -> SearchHits:
        """Ids, metadata (and vectors when asked) of ranked labels; call under the read lock."""
        if return_vectors and vectors is None:
            vectors = self._faiss.reconstruct(labels) if isinstance(self._faiss, ExactIndex) else self._indexed_vectors(labels)
        infos = self._answerable_each(self.store.infos([int(l) for l in labels]))
        return SearchHits(
            [i.image_id for i in infos], scores.astype(np.float32), vectors if return_vectors else None, [i.metadata for i in infos]
        )

    def _filtered_search(self, q: np.ndarray, top_k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Top-k among the ``allowed`` labels (sorted), so that k results come back when k match.

        Exact index: one faiss search restricted by an id selector (exact by construction).
        Approximate index: exact scoring over the allowed images' stored vectors when they are
        at most ``settings.filter_exact_max``; otherwise the IVF search restricted by the
        selector (then re-scored exactly), falling back to exact scoring in chunks when the
        probed lists held fewer than k allowed images."""
        k = min(top_k, len(allowed))
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32), None
        if isinstance(self._faiss, ExactIndex) or len(allowed) > self.settings.filter_exact_max:
            labels, scores, vectors = self._faiss.search(q, k, self._indexed_vectors, allowed=allowed)
            if len(labels) >= k:
                return labels, scores, vectors
        best_l, best_s = np.zeros(0, np.int64), np.zeros(0, np.float32)
        for start in range(0, len(allowed), self.settings.filter_exact_max):
            chunk = allowed[start : start + self.settings.filter_exact_max]
            scores = self._indexed_vectors(chunk) @ q
            best_l, best_s = np.concatenate([best_l, chunk]), np.concatenate([best_s, scores.astype(np.float32)])
            if len(best_l) > k:
                top = np.argsort(-best_s, kind="stable")[:k]
                best_l, best_s = best_l[top], best_s[top]
        order = np.argsort(-best_s, kind="stable")[:k]
        return best_l[order], best_s[order], None

    def _ensure_metadata_index(self) -> None:
        """Build the metadata inverted index from the store (first filtered call only)."""
        if self._meta is not None:
            return
        with self._lock.write():
            if self._meta is not None:
                return
            t0 = time.perf_counter()
            meta = MetadataIndex()
            for label, info in self.store.iter_infos():
                meta.add(label, info.metadata)
            self._meta = meta
        log.info("shard store %s: metadata index built over %d keys in %.2f s", self.store.path, len(meta.postings), time.perf_counter() - t0)

    def get_infos(self, ids: list[str], want_vector: bool = False) -> list[tuple[ImageInfo, np.ndarray | None] | None]:
        """Id, size, metadata and (when asked) the raw global vector of each id; None when absent."""
        pairs = self.store.id_infos(ids)
        answerable = iter(self._answerable_each([f[1] for f in pairs if f is not None]))
        found = [None if f is None else (f[0], next(answerable)) for f in pairs]
        if not want_vector:
            return [None if f is None else (f[1], None) for f in found]
        out: list[tuple[ImageInfo, np.ndarray | None] | None] = []
        for f in found:
            img = self.store.get(f[1].image_id, regional=False, local=False) if f is not None else None  # its vector only
            out.append(None if img is None else (f[1], img.vector))
        return out

    def list_ids(self, after: str, limit: int, conditions: list[CompiledCondition] | None, max_scan: int) -> tuple[list[ImageInfo], bool, str]:
        """Images with id > ``after`` in id order (bytewise UTF-8), at most ``limit`` of them,
        examining at most ``max_scan`` ids; returns (infos, done, last id examined)."""
        if conditions:
            self._ensure_metadata_index()
        with self._lock.read():
            pairs, done = self.store.ids_after(after, max_scan)
            if conditions:
                allowed = self._meta.match(conditions)
                labels = np.asarray([l for _, l in pairs], np.int64)
                keep = np.isin(labels, allowed, assume_unique=False) if len(labels) else np.zeros(0, bool)
                picked = [p for p, k in zip(pairs, keep) if k]
            else:
                picked = pairs
            if len(picked) > limit:
                picked = picked[:limit]
                done, last = False, picked[-1][0]
            else:
                last = pairs[-1][0] if pairs else after
            infos = self.store.infos([l for _, l in picked])
        return self._answerable_each([i for i in infos if i is not None]), done, last

    def get(self, image_id: str, *, regional: bool = True, local: bool = True) -> StoredImage | None:
        """The stored record of an id (only the parts asked for) as answers carry it, or None:
        metadata, regional vectors or local features above today's write limits are withheld."""
        img = self.store.get(image_id, regional=regional, local=local)
        if img is None:
            return None
        info = self._answerable(ImageInfo(img.image_id, img.width, img.height, img.metadata))
        dim = len(img.vector)
        if img.regional is not None and (why := above_limits({}, dim, len(img.regional), 0, 0)):
            self._withhold(image_id, "regional vectors", why)
            img = replace(img, regional=None)
        if img.local is not None and (why := above_limits({}, dim, 0, *img.local.descriptors.shape)):
            self._withhold(image_id, "local features", why)
            img = replace(img, local=None)
        return replace(img, metadata=info.metadata)

    def _answerable_each(self, infos: list[ImageInfo]) -> list[ImageInfo]:
        """:meth:`_answerable` of each info; nothing to check when the store counts no record above
        today's limits (its ``oversized`` counter, kept by every write): a search then answers its
        1,000 hits without re-validating 1,000 metadata maps."""
        if not infos or not self.store.oversized():
            return infos
        return [self._answerable(i) for i in infos]

    def _answerable(self, info: ImageInfo) -> ImageInfo:
        """``info`` as answers carry it: metadata above today's limits (a record stored before
        they existed) is withheld, so one old record cannot push an answer past the message limit."""
        try:
            limits.check_metadata(info.metadata, "metadata")
        except InvalidArgument as exc:
            self._withhold(info.image_id, "metadata", str(exc))
            return replace(info, metadata={})
        return info

    def _withhold(self, image_id: str, part: str, why: str) -> None:
        """Log (once per id and shard process) that an answer left out a part of a stored record."""
        if len(self._withheld_logged) < 10_000 and image_id not in self._withheld_logged:
            self._withheld_logged.add(image_id)
            log.warning("shard store %s: %r is above today's limits (%s): its %s are left out of answers",
                        self.store.path, image_id[:64], why, part)

    def list_vectors(self, cursor: int, limit: int, regional: bool = False) -> VectorPage:
        """One page of stored images in label order, vectors in the indexed space.

        Labels only grow (a replaced image gets a new one), so ``cursor`` (the first label not
        yet returned) survives concurrent writes.
        """
        with self._lock.read():
            labels = self.store.labels_from(cursor, limit + 1)
            done = len(labels) <= limit
            page = labels[:limit]
            empty = np.zeros((0, self.indexed_dim), np.float32)
            if not page:
                return VectorPage([], empty, cursor, True, empty, [])
            vecs = self._indexed_vectors(np.asarray(page))
            infos = self.store.infos(page)
            regs, counts = empty, []
            if regional:
                per = self.store.regional_of(page, self.dim)
                counts = [0 if x is None else len(x) for x in per]
                present = [x for x in per if x is not None and len(x)]
                if present:
                    regs = self.transform(np.concatenate(present).astype(np.float32))
        return VectorPage([i.image_id for i in infos], vecs, page[-1] + 1, done, regs, counts)

    def sample_vectors(self, max_vectors: int, seed: int, regional: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Random sample of raw global (n, D) and, if asked, regional (m, D) vectors."""
        rng = np.random.default_rng(seed)
        with self._lock.read():
            labels = self.store.all_labels()
            if not len(labels):
                return np.zeros((0, self.dim), np.float32), np.zeros((0, self.dim), np.float32)
            pick = np.sort(labels[rng.choice(len(labels), size=min(max_vectors, len(labels)), replace=False)])
            g = self.store.vectors([int(l) for l in pick], self.dim)
            if not regional:
                return g, np.zeros((0, self.dim), np.float32)
            regs = [r for r in self.store.regional_of([int(l) for l in pick], self.dim) if r is not None]
        r = np.concatenate(regs).astype(np.float32) if regs else np.zeros((0, self.dim), np.float32)
        if len(r) > max_vectors:
            r = r[rng.choice(len(r), size=max_vectors, replace=False)]
        return g, r

    def stats(self) -> dict[str, int]:
        """Counts and bytes: images, regional_vectors, local_features, feature_bytes, store_bytes,
        index_bytes (RAM of the faiss index), the store's sequence number and the records above
        today's write limits (oversized)."""
        c = self.store.counters()
        with self._lock.read():
            index_bytes = self._index_bytes_estimate()
        return {
            "images": c["images"], "regional_vectors": c["regional_vectors"], "local_features": c["local_features"],
            "feature_bytes": c["feature_bytes"], "store_bytes": self.store.size_bytes(), "index_bytes": index_bytes,
            "sequence": c["seq"], "oversized": c["oversized"],
            "max_version": c["max_version"], "digest": c["digest"], "tombstones": c["tombstones"],
        }

    def _index_bytes_estimate(self) -> int:
        idx = self._faiss
        if idx is None:
            return 0
        if isinstance(idx, ExactIndex):
            return idx.ntotal * (4 * idx.dim + 16)
        code = getattr(faiss.try_extract_index_ivf(idx.index), "code_size", 4 * idx.dim)
        return idx.ntotal * (int(code) + 8)

    # --- maintenance: approximate index, snapshots --------------------------------------
    def _maybe_maintain(self) -> None:
        """Start the background job when the approximate index is due or a snapshot is."""
        if self._closed:
            return
        with self._lock.write():
            busy = self._worker is not None and self._worker.is_alive()
            if busy or self._faiss is None:
                return
            need_approx = self.settings.approximate and (
                (isinstance(self._faiss, ExactIndex) and self._faiss.ntotal >= self.settings.approx_min_images)
                or (  # grown well past what its lists were sized for: retrain (the old index serves meanwhile)
                    isinstance(self._faiss, ApproxIndex) and self.settings.factory == "auto"
                    and self._faiss.ntotal >= self.settings.retrain_growth * self._faiss.trained_for
                )
            )
            pending = self.store.pending_changes()
            # every ``snapshot_every`` changes (not commits: one AddImages batch is many), and at
            # once after the store was compacted at open: the old snapshot still holds what it freed
            need_snapshot = pending >= self.settings.snapshot_every or (pending > 0 and self._snapshot_compacted)
            if not (need_approx or need_snapshot):
                return
            if not self.background:
                job = self._train_approx if need_approx else self.snapshot
            else:
                job = None
        if job is not None:
            job()
            return
        self._worker = threading.Thread(
            target=self._train_approx if need_approx else self._snapshot_quietly, name="loupe-shard-maintenance", daemon=True
        )
        self._worker.start()

    def _snapshot_quietly(self) -> None:
        try:
            self.snapshot()
        except Exception:  # a failed snapshot (disk full) is retried after more changes
            log.exception("shard store %s: snapshot failed", self.store.path)

    def snapshot(self) -> int:
        """Write the faiss index with the sequence number it reflects; returns that number."""
        with self._lock.read():
            if self._faiss is None or self._building:
                return self._last_snapshot_seq
            seq = self.store.counters()["seq"]
            blob = serialize(self._faiss.index)
            kind, dim, wcrc = self._faiss.kind, self.indexed_dim, self.whitening_crc()
            factory = getattr(self._faiss, "factory", "Flat")
            trained_for = getattr(self._faiss, "trained_for", 0)
        record = write_blob(blob, os.path.join(self.store.path, SNAPSHOT_FILE))
        record.update(seq=seq, kind=kind, dim=dim, whitening_crc32=wcrc, factory=factory, trained_for=trained_for)
        with self._lock.write():
            if wcrc != self.whitening_crc():
                return self._last_snapshot_seq  # whitening changed while writing: the file is stale
            self.store.record_snapshot(seq, record)
            self._last_snapshot_seq = seq
            self._snapshot_compacted = False
        log.info("shard store %s: snapshot at seq %d (%.1f MB)", self.store.path, seq, record["bytes"] / 1e6)
        return seq

    def _train_approx(self) -> None:
        """Train the approximate index on a sample, fill it from one read snapshot of the store,
        catch up with the writes made meanwhile, swap it in. Searches stay exact until then."""
        t0 = time.perf_counter()
        with self._lock.write():
            self._building = True
            wcrc = self.whitening_crc()
            n = self._faiss.ntotal
            factory = self.settings.factory if self.settings.factory != "auto" else ivfpq_factory(n, self.indexed_dim, train_n=min(n, self.settings.train_sample))
            rng = np.random.default_rng(0)
            labels = self.store.all_labels()
            sample_labels = np.sort(labels[rng.choice(len(labels), min(self.settings.train_sample, len(labels)), replace=False)])
        try:
            sample = self._indexed_vectors(sample_labels)
            built = ApproxIndex.train(factory, sample, self.settings.shortlist, self.settings.nprobe)
            built.trained_for = n
            del sample
            seen: list[int] = []
            for chunk_labels, vecs in self.store.iter_vectors(self.dim, on_open=seen.append):
                built.add(chunk_labels, self.transform(vecs))
            # catch up with the writes made meanwhile outside the lock (the new index is not
            # serving yet), then take the lock only for the last few and the swap
            seq = seen[0]
            while True:
                pending = self.store.changes_after(seq)
                if len(pending) < 4096:
                    break
                self._apply_changes(pending, built)
                seq = pending[-1][0]
            with self._lock.write():
                if self._closed or wcrc != self.whitening_crc():
                    return
                self._apply_changes(self.store.changes_after(seq), built)
                self._faiss, exact = built, self._faiss
                del exact
            log.info("shard store %s: approximate index %s trained on %d vectors, %d indexed, %.1f s",
                     self.store.path, factory, len(sample_labels), built.ntotal, time.perf_counter() - t0)
        except Exception:
            log.exception("shard store %s: training the approximate index failed; searches stay exact", self.store.path)
            return
        finally:
            with self._lock.write():
                self._building = False
        self.snapshot()

    @property
    def snapshot_sequence(self) -> int:
        """Sequence number the last faiss snapshot reflects (0 = none yet)."""
        return self._last_snapshot_seq

    def wait_idle(self, timeout_s: float = 600.0) -> None:
        """Block until background maintenance is done (tests, benchmarks, clean shutdown)."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout_s)

    def close(self) -> None:
        """Finish maintenance, snapshot, close the store."""
        self.wait_idle()
        try:
            with self._lock.read():
                behind = self.store.counters()["seq"] > self._last_snapshot_seq
            if behind:
                self.snapshot()
        except Exception:
            log.exception("shard store %s: final snapshot failed (the next start replays the changes)", self.store.path)
        with self._lock.write():
            self._closed = True
            self.store.close()
