"""Collection-level transforms owned by the broker: the PCA of local descriptors (to 40-D).

The PCA is learned on the collection itself: from the local descriptors of the first
AddImages batch that carries any (``loupe index`` sends a batch of 16 images → ~16k
descriptors), then frozen and persisted as ``local_pca.npz`` in the data directory so a
restarted broker projects queries exactly as the stored descriptors were projected.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from services.extractor.whitening import LocalPCA

LOCAL_DIM = 40
MAX_FIT_DESCRIPTORS = 50_000


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
        self.local_pca: LocalPCA | None = None
        path = self._path()
        if path and os.path.exists(path):
            with open(path, "rb") as f:
                self.local_pca = LocalPCA.from_bytes(f.read())

    def _path(self) -> str:
        return os.path.join(self.directory, "local_pca.npz") if self.directory else ""

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
            path = self._path()
            if path:
                os.makedirs(self.directory, exist_ok=True)
                tmp = path + ".tmp"
                with open(tmp, "wb") as f:
                    f.write(pca.to_bytes())
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            self.local_pca = pca
            return pca

    def project(self, descriptors: np.ndarray) -> np.ndarray:
        """(N, C) raw local descriptors → (N, 40) L2-normalised; requires a learned PCA."""
        if self.local_pca is None:
            raise RuntimeError("local PCA not learned yet")
        return self.local_pca.apply(np.asarray(descriptors, dtype=np.float32)).astype(np.float32)
