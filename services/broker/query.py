"""A search's query once prepared: what the fan-out and the rerank stages work from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from loupe.v1 import retrieval_pb2, types_pb2
from services.common.errors import InvalidArgument

if TYPE_CHECKING:
    from services.broker.search_plan import SearchPlan


@dataclass(frozen=True)
class Query:
    """A query ready for the fan-out.

    Attributes
    ----------
    vector : np.ndarray
        (D,) raw L2-normalised global descriptor (the shards whiten it).
    local : tuple of np.ndarray or None
        (N, 4) keypoints and (N, C') collection-PCA local descriptors, for verification.
    regions : np.ndarray or None
        (R, D') regional descriptors in the indexed space, for regional diffusion.
    exclude : str or None
        Id left out of the results (the query image of a search by stored id).
    filter : types_pb2.Filter or None
        Metadata filter every shard applies before its top-k.
    """

    vector: np.ndarray
    local: tuple[np.ndarray, np.ndarray] | None = None
    regions: np.ndarray | None = None
    exclude: str | None = None
    filter: types_pb2.Filter | None = None

    def depth(self, request: retrieval_pb2.SearchRequest, plan: "SearchPlan") -> int:
        """Candidates asked of each shard: enough for the page and every rerank stage (one
        more when the query image itself will be dropped)."""
        return max(request.offset + request.k, plan.depth) + (1 if self.exclude is not None else 0)


def unit_vector(v: np.ndarray, field: str = "vector") -> np.ndarray:
    """Validate a client-supplied raw descriptor and L2-normalise it."""
    if v.ndim != 1 or not np.all(np.isfinite(v)):
        raise InvalidArgument(f"{field}: expected a finite (D,) vector, got shape {list(v.shape)}")
    norm = float(np.linalg.norm(v))
    if norm == 0:
        raise InvalidArgument(f"{field}: must not be all zeros")
    return v / norm
