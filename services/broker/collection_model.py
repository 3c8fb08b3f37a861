"""Collection-level state owned by the broker: the PCA of local descriptors (to 40-D), the
PCA-whitening of global/regional descriptors (also installed on every shard) and the
collection's offline kNN graph for diffusion (``graph.npz``; ids replaced or deleted since the
build are appended to ``graph_stale.txt`` and joined online until the next build).

The PCA is learned on the collection itself: from the local descriptors of the first
AddImages batch that carries any (``loupe index`` sends a batch of 16 images → ~16k
descriptors), then frozen and persisted as ``local_pca.npz`` in the data directory so a
restarted broker projects queries exactly as the stored descriptors were projected.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from services.broker import regional_copy
from services.broker.regional_copy import RegionalCopy, RegionalCopyWriter
from services.space.whitening import LocalPCA, PCAWhitening, to_indexed_space
from services.rerank.graph import CollectionGraph
from services.space.regions import MAX_REGIONS_PER_IMAGE

LOCAL_DIM = 40
MAX_FIT_DESCRIPTORS = 50_000
MODEL_FILES = ("local_pca.npz", "whitening.npz", "graph.npz", "graph_regional.npz", "graph_stale.txt")
"""Files of the collection model in the broker's data directory (what a backup copies)."""


def region_node(image_id: str, j: int) -> str:
    """Node id of an image's j-th regional vector in the regional graph."""
    return f"{image_id}#{j}"


def region_nodes(image_ids: list[str]) -> list[str]:
    """Every possible regional node id of ``image_ids`` (for forgetting them)."""
    return [region_node(i, j) for i in image_ids if i for j in range(MAX_REGIONS_PER_IMAGE)]


class CollectionModel:
    """Holds (and persists) the collection's local-descriptor PCA.

    Parameters
    ----------
    directory : str
        Where ``local_pca.npz`` lives; "" keeps it in memory only.
    """

    def __init__(self, directory: str = "") -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._load({name: self._read(name) for name in MODEL_FILES})

    def _load(self, files: dict[str, bytes]) -> None:
        """Set the in-memory model from file contents by name (absent or empty = none)."""
        pca, whitening = files.get("local_pca.npz", b""), files.get("whitening.npz", b"")
        self.local_pca: LocalPCA | None = LocalPCA.from_bytes(pca) if pca else None
        self.whitening: PCAWhitening | None = PCAWhitening.from_bytes(whitening) if whitening else None
        graph, regional = files.get("graph.npz", b""), files.get("graph_regional.npz", b"")
        self.graph: CollectionGraph | None = CollectionGraph.from_bytes(graph) if graph else None
        self.regional_graph: CollectionGraph | None = CollectionGraph.from_bytes(regional) if regional else None
        # the regional vectors regional diffusion reads (memory-mapped; None: read from the shards)
        self.regional_copy: RegionalCopy | None = (
            RegionalCopy.load(self.directory) if self.directory and self.regional_graph is not None else None
        )
        stale = files.get("graph_stale.txt", b"").decode().split("\n")
        if self.graph is not None:
            self.graph.forget(stale)
        if self.regional_graph is not None:
            self.regional_graph.forget(region_nodes(stale))
        if self.regional_copy is not None:
            self.regional_copy.forget(stale)
        self._forgotten_during_build: set[str] | None = None

    def files(self) -> dict[str, bytes]:
        """The model as its files (name → bytes, only those that exist), read together under the
        lock: what a backup copies. Without a directory, the in-memory model serialised (the graphs
        without their list of stale ids)."""
        with self._lock:
            if self.directory:
                return {name: data for name in MODEL_FILES if (data := self._read(name))}
            out = {"local_pca.npz": self.local_pca.to_bytes() if self.local_pca is not None else b"",
                   "whitening.npz": self.whitening.to_bytes() if self.whitening is not None else b"",
                   "graph.npz": self.graph.to_bytes() if self.graph is not None else b"",
                   "graph_regional.npz": self.regional_graph.to_bytes() if self.regional_graph is not None else b""}
            return {name: data for name, data in out.items() if data}

    def install(self, files: dict[str, bytes]) -> None:
        """Replace the whole model by ``files`` (name → bytes, as ``files()`` gives; a name not in
        ``MODEL_FILES`` is ignored): parsed first (a bad file raises before anything changes),
        then persisted and loaded. What a restore does."""
        with self._lock:
            probe = CollectionModel.__new__(CollectionModel)
            probe.directory = ""  # parse only: no memory-mapped files
            probe._load(files)  # parse errors surface here, the current model untouched
            for name in MODEL_FILES:
                self._write(name, files.get(name, b""))
            self._load(files)

    def _path(self, name: str = "local_pca.npz") -> str:
        return os.path.join(self.directory, name) if self.directory else ""

    def _read(self, name: str) -> bytes:
        path = self._path(name)
        if not path or not os.path.exists(path):
            return b""
        with open(path, "rb") as f:
            return f.read()

    def _write(self, name: str, data: bytes) -> None:
        """Atomically persist ``data`` (fsync, then rename); removes the file for empty data."""
        path = self._path(name)
        if not path:
            return
        os.makedirs(self.directory, exist_ok=True)
        if not data:
            if os.path.exists(path):
                os.remove(path)
            return
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def whitening_payload(self) -> bytes:
        """The whitening as ``SetWhiteningRequest.whitening`` carries it (b"" = none)."""
        return self.whitening.to_bytes() if self.whitening is not None else b""

    def set_whitening(self, whitening: PCAWhitening | None) -> None:
        """Install (None: remove) the global whitening and persist it; drops the graph (its
        similarities were measured in the old space)."""
        with self._lock:
            self._write("whitening.npz", whitening.to_bytes() if whitening is not None else b"")
            self.whitening = whitening
        self.set_graph(None)

    def begin_build(self) -> RegionalCopyWriter:
        """A graph build starts: images written from now on are forgotten by the graphs it
        installs (they may have been paged before the write). Returns the writer of the build's
        regional copy."""
        with self._lock:
            self._forgotten_during_build = set()
        return RegionalCopyWriter(self.directory)

    def end_build(self) -> None:
        """A build ended without installing graphs."""
        with self._lock:
            self._forgotten_during_build = None

    def set_graph(self, graph: CollectionGraph | None, regional: CollectionGraph | None = None,
                  copy: RegionalCopy | None = None) -> None:
        """Install (None: remove) the collection's kNN graphs (global; regional, whose node ids
        come from :func:`region_nodes`) and the regional copy of the same build, and persist them."""
        with self._lock:
            written = sorted(self._forgotten_during_build or ())
            self._forgotten_during_build = None
            self._write("graph_stale.txt", "".join(i + "\n" for i in written).encode() if graph is not None else b"")
            self._write("graph.npz", graph.to_bytes() if graph is not None else b"")
            self._write("graph_regional.npz", regional.to_bytes() if regional is not None else b"")
            if copy is None:
                regional_copy.remove(self.directory)
            for g in (graph, copy):
                if g is not None:
                    g.forget(written)
            if regional is not None:
                regional.forget(region_nodes(written))
            self.graph, self.regional_graph, self.regional_copy = graph, regional, copy

    def graph_forget(self, ids: list[str]) -> None:
        """Images replaced or deleted: the graphs stop covering them (persisted, appended)."""
        with self._lock:
            if self._forgotten_during_build is not None:
                self._forgotten_during_build.update(ids)
            graph = self.graph
            if graph is None:
                return
            if self.regional_copy is not None:
                self.regional_copy.forget(ids)
            stale = [i for i in ids if graph.rows_of([i])[0] >= 0]
            if not stale:
                return
            graph.forget(stale)
            if self.regional_graph is not None:
                self.regional_graph.forget(region_nodes(stale))
            path = self._path("graph_stale.txt")
            if path:
                with open(path, "a", encoding="utf-8") as f:
                    f.write("".join(i + "\n" for i in stale))

    def transform(self, raw: np.ndarray) -> np.ndarray:
        """(n, D) raw L2-normalised descriptors → (n, D') as the shards index them."""
        return to_indexed_space(raw, self.whitening)

    def ensure_local_pca(self, descriptors: list[np.ndarray], seed: int = 0) -> LocalPCA:
        """The PCA, learning it from ``descriptors`` ((N_i, C) arrays) when there is none yet."""
        with self._lock:
            if self.local_pca is not None:
                return self.local_pca
            x = np.concatenate([d for d in descriptors if len(d)]).astype(np.float32)
            if len(x) > MAX_FIT_DESCRIPTORS:
                x = x[np.random.default_rng(seed).choice(len(x), MAX_FIT_DESCRIPTORS, replace=False)]
            pca = LocalPCA()
            pca.fit(x, dim=min(LOCAL_DIM, x.shape[1], max(1, len(x) - 1)))
            self._write("local_pca.npz", pca.to_bytes())
            self.local_pca = pca
            return pca

    def project(self, descriptors: np.ndarray) -> np.ndarray:
        """(N, C) raw local descriptors → (N, 40) L2-normalised; requires a learned PCA."""
        if self.local_pca is None:
            raise RuntimeError("local PCA not learned yet")
        return self.local_pca.apply(np.asarray(descriptors, dtype=np.float32)).astype(np.float32)
