"""The collection's offline kNN graph, restricted per query to its top-R neighbourhood.

Iscen et al. (CVPR 2017) build the kNN graph of the whole collection once, offline, and at
query time diffuse over the subgraph of the query's truncated neighbourhood; an unseen query
only needs its own similarities (the seed). :class:`CollectionGraph` holds that graph: for each
indexed image its ``k`` nearest other images (exact inner product in the indexed space) and
their similarities. :meth:`CollectionGraph.neighbourhood_lists` turns it into per-node
neighbour lists over a given neighbourhood in O(R k), so diffusion per query costs the
sparse solve, not an O(R² D) graph construction.

Images the graph does not cover (added or replaced after it was built) are joined online:
their own lists are computed against the neighbourhood, and a covered node lists such an
image too when it is at least as similar as that node's k-th offline neighbour — exactly the
list a rebuilt graph would give it within the neighbourhood.

Storage: ``int32`` neighbour rows and ``float16`` similarities, 6 bytes per edge (300 bytes
per image at k=50).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import faiss
import numpy as np

EXACT_LIMIT = 200_000
"""Above this many nodes the graph is built by :class:`StreamingGraphBuilder` (approximate, from
compressed codes) instead of exact search over vectors held in RAM."""


class CollectionGraph:
    """kNN graph of the indexed collection.

    Parameters
    ----------
    ids : sequence of str
        ``(N,)`` image ids, row order.
    neighbours : ndarray ``(N, k)`` int32
        Row indices of each image's nearest other images by decreasing similarity; -1 pads.
    sims : ndarray ``(N, k)`` float16
        Their similarities.
    """

    def __init__(self, ids: Sequence[str], neighbours: np.ndarray, sims: np.ndarray) -> None:
        neighbours = np.asarray(neighbours, dtype=np.int32)
        sims = np.asarray(sims, dtype=np.float16)
        if neighbours.ndim != 2 or neighbours.shape != sims.shape or len(neighbours) != len(ids):
            raise ValueError(f"graph: ids ({len(ids)}), neighbours {neighbours.shape} and sims {sims.shape} disagree")
        self.ids = list(ids)
        self.neighbours = neighbours
        self.sims = sims
        self._row = {image_id: i for i, image_id in enumerate(self.ids)}
        if len(self._row) != len(self.ids):
            raise ValueError("graph: duplicate image ids")

    @property
    def k(self) -> int:
        """Neighbours stored per image."""
        return int(self.neighbours.shape[1])

    def __len__(self) -> int:
        """Images the graph covers (built minus forgotten)."""
        return len(self._row)

    @property
    def nbytes(self) -> int:
        return int(self.neighbours.nbytes + self.sims.nbytes)

    @classmethod
    def build(cls, ids: Sequence[str], vectors: np.ndarray, k: int, batch: int = 4096) -> CollectionGraph:
        """Exact kNN graph of vectors held in RAM (up to :data:`EXACT_LIMIT` nodes; beyond,
        use :class:`StreamingGraphBuilder`).

        Parameters
        ----------
        ids : sequence of str
            ``(N,)`` image ids.
        vectors : ndarray ``(N, D)`` float32
            L2-normalised vectors in the indexed space.
        k : int
            Neighbours per image, ``>= 1`` (clipped to ``N - 1``).
        """
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if x.ndim != 2 or len(x) != len(ids):
            raise ValueError(f"graph: {len(ids)} ids but vectors of shape {x.shape}")
        if k < 1:
            raise ValueError(f"graph: k must be >= 1, got {k}")
        n = len(x)
        k_eff = min(k, max(n - 1, 0))
        if n == 0 or k_eff == 0:
            return cls(ids, np.full((n, 0), -1, np.int32), np.zeros((n, 0), np.float16))
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        nbrs = np.empty((n, k_eff), np.int32)
        sims = np.empty((n, k_eff), np.float16)
        for start in range(0, n, batch):
            s, i = index.search(x[start : start + batch], k_eff + 1)
            rows = np.arange(start, start + len(s))[:, None]
            not_self = i != rows
            # keep the first k_eff entries that are not the row itself (it may not come first on ties)
            order = np.argsort(~not_self, axis=1, kind="stable")[:, :k_eff]
            nbrs[start : start + len(s)] = np.take_along_axis(i, order, 1)
            sims[start : start + len(s)] = np.take_along_axis(s, order, 1)
        return cls(ids, nbrs, sims)

    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        """``(R,)`` int64 graph rows of ``ids``; -1 for ids the graph does not cover."""
        get = self._row.get
        return np.array([get(i, -1) for i in ids], dtype=np.int64).reshape(len(ids))

    def forget(self, ids: Sequence[str]) -> None:
        """Stop covering ``ids`` (replaced or deleted images): they are joined online again."""
        for image_id in ids:
            self._row.pop(image_id, None)

    def neighbourhood_lists(self, ids: Sequence[str], vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Directed kNN edges among a neighbourhood, from the graph (online for uncovered nodes).

        Parameters
        ----------
        ids : sequence of str
            ``(R,)`` the neighbourhood's image ids.
        vectors : ndarray ``(R, D)``
            Their L2-normalised vectors in the indexed space (used for uncovered nodes only).
        k : int
            Neighbours per node (at most :attr:`k` from the graph).

        Returns
        -------
        (src, dst, sim) : ndarrays ``(E,)`` int64, int64, float32
            Edge ``src -> dst`` (positions in ``ids``) when ``dst`` is among ``src``'s k nearest
            images of the collection and lies in the neighbourhood.
        """
        n = len(ids)
        rows = self.rows_of(ids)
        covered = np.flatnonzero(rows >= 0)
        uncovered = np.flatnonzero(rows < 0)
        kk = min(k, self.k)
        src, dst, sim = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
        if len(covered) and kk:
            position = np.full(len(self.ids), -1, np.int64)
            position[rows[covered]] = covered
            nb = self.neighbours[rows[covered], :kk]
            local = np.where(nb >= 0, position[np.maximum(nb, 0)], -1)
            keep = local >= 0
            src.append(np.repeat(covered, kk)[keep.ravel()])
            dst.append(local[keep])
            sim.append(self.sims[rows[covered], :kk][keep].astype(np.float32))
        if len(uncovered):
            x = np.ascontiguousarray(vectors, dtype=np.float32)
            s_u = x[uncovered] @ x.T  # (U, R)
            s_u[np.arange(len(uncovered)), uncovered] = -np.inf
            top = min(k, n - 1)
            if top > 0:
                nearest = np.argpartition(-s_u, top - 1, axis=1)[:, :top]
                src.append(np.repeat(uncovered, top))
                dst.append(nearest.ravel())
                sim.append(np.take_along_axis(s_u, nearest, 1).ravel())
            if len(covered) and kk:
                # a covered node lists an uncovered one that beats its k-th offline neighbour
                kth = self.sims[rows[covered], kk - 1].astype(np.float32)
                kth[self.neighbours[rows[covered], kk - 1] < 0] = -np.inf
                s_cu = s_u[:, covered].T  # (C, U)
                ci, ui = np.nonzero(s_cu >= kth[:, None])
                src.append(covered[ci])
                dst.append(uncovered[ui])
                sim.append(s_cu[ci, ui])
        return np.concatenate(src), np.concatenate(dst), np.concatenate(sim).astype(np.float32)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, ids=np.array(self.ids, dtype=object).astype(str), neighbours=self.neighbours, sims=self.sims)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> CollectionGraph:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls([str(i) for i in z["ids"]], z["neighbours"], z["sims"])


class StreamingGraphBuilder:
    """Approximate kNN graph of a collection too large to hold as float vectors.

    The collection is streamed twice in pages: :meth:`add` compresses every page into an IVF-PQ
    index (``services.space.ann.ivfpq_factory``: ~64 bytes per node instead of 4·D), then
    :meth:`search` finds each page's ``k`` nearest other nodes in it; similarities are the codes'
    approximations of the inner product. RAM: the codes, the ``(N, k)`` graph (6 bytes per edge)
    and one page of vectors.

    Parameters
    ----------
    sample : ndarray ``(n, D)`` float32
        Training vectors (a random sample of the collection, in the indexed space).
    expected : int
        Nodes expected (sizes the inverted lists).
    k : int
        Neighbours per node.
    nprobe : int
        Inverted lists visited per query.
    """

    def __init__(self, sample: np.ndarray, expected: int, k: int, nprobe: int = 32) -> None:
        from services.space.ann import ivfpq_factory

        if k < 1:
            raise ValueError(f"graph: k must be >= 1, got {k}")
        x = np.ascontiguousarray(sample, dtype=np.float32)
        if len(x) < 256:
            raise ValueError(f"graph: {len(x)} training vectors, the codes need at least 256")
        self.factory = ivfpq_factory(expected, x.shape[1], train_n=len(x))
        self.index = faiss.index_factory(x.shape[1], self.factory, faiss.METRIC_INNER_PRODUCT)
        self.index.train(x)
        faiss.extract_index_ivf(self.index).nprobe = nprobe
        self.k = k
        self.ids: list[str] = []
        self._row: dict[str, int] = {}
        self._nbrs: np.ndarray | None = None
        self._sims: np.ndarray | None = None

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add a page: ``(n,)`` ids and their ``(n, D)`` vectors. An id seen again (replaced
        while paging) keeps its newest vector; the older row is dropped."""
        rows = np.arange(len(self.ids), len(self.ids) + len(ids), dtype=np.int64)
        stale = [self._row[i] for i in ids if i in self._row]
        if stale:
            self.index.remove_ids(faiss.IDSelectorBatch(np.asarray(stale, np.int64)))
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), rows)
        for image_id, r in zip(ids, rows):
            self._row[image_id] = int(r)
        self.ids.extend(ids)

    def search(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Find the neighbours of a page (second pass); ids not added in the first pass are
        skipped (they are joined online at query time, like images added after a build)."""
        if self._nbrs is None:
            self._nbrs = np.full((len(self.ids), self.k), -1, np.int32)
            self._sims = np.zeros((len(self.ids), self.k), np.float16)
        rows = np.array([self._row.get(i, -1) for i in ids], np.int64)
        keep = np.flatnonzero(rows >= 0)
        if not len(keep):
            return
        s, nb = self.index.search(np.ascontiguousarray(vectors[keep], dtype=np.float32), self.k + 1)
        own = rows[keep][:, None]
        order = np.argsort((nb == own) | (nb < 0), axis=1, kind="stable")[:, : self.k]
        nb, s = np.take_along_axis(nb, order, 1), np.take_along_axis(s, order, 1)
        nb[(nb == own) | (nb < 0)] = -1
        self._nbrs[rows[keep]] = nb.astype(np.int32)
        self._sims[rows[keep]] = np.where(nb >= 0, s, 0).astype(np.float16)

    def finish(self) -> CollectionGraph:
        """The graph over the newest row of every id (stale rows removed, neighbours remapped)."""
        n = len(self.ids)
        if self._nbrs is None:
            self._nbrs = np.full((n, self.k), -1, np.int32)
            self._sims = np.zeros((n, self.k), np.float16)
        live = np.zeros(n, bool)
        live[list(self._row.values())] = True
        new_row = np.full(n + 1, -1, np.int64)  # index n maps the -1 padding
        new_row[np.flatnonzero(live)] = np.arange(int(live.sum()))
        nbrs = self._nbrs[live]
        nbrs = new_row[np.where(nbrs >= 0, nbrs, n)].astype(np.int32)
        return CollectionGraph([self.ids[r] for r in np.flatnonzero(live)], nbrs, self._sims[live])
