"""k-way merge of per-shard ranked lists into one global top-k."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence


@dataclass(frozen=True, order=True)
class Hit:
    """One candidate: ``score`` (ordering key), its ``image_id``, owning shard, metadata and,
    when the shard returned it, its indexed global vector ``(D',)``."""

    score: float
    image_id: str = field(compare=False)
    shard_id: int = field(compare=False, default=-1)
    payload: Any = field(compare=False, default=None)
    vector: Any = field(compare=False, default=None)


def merge_topk(lists: Iterable[Sequence[Hit]], k: int, larger_is_better: bool = True) -> list[Hit]:
    """Merge lists that are each sorted best-first into the overall best ``k``, ids deduplicated.

    Each input list must already be sorted best-first (shards return them so). An id present
    in several lists (e.g. a re-added image during a rebalancing) keeps its best occurrence.
    Ties keep the order of the input lists, so the merge is deterministic.

    Parameters
    ----------
    lists : iterable of sequences of Hit
        Per-shard results, best first.
    k : int
        Number of hits wanted (>= 0).
    larger_is_better : bool
        True for similarities, False for distances.
    """
    if k <= 0:
        return []
    sign = -1.0 if larger_is_better else 1.0
    iters = [iter(lst) for lst in lists]
    heap: list[tuple[float, int, Hit]] = []
    for i, it in enumerate(iters):
        first = next(it, None)
        if first is not None:
            heap.append((sign * first.score, i, first))
    heapq.heapify(heap)
    out: list[Hit] = []
    seen: set[str] = set()
    while heap and len(out) < k:
        _, i, hit = heapq.heappop(heap)
        if hit.image_id not in seen:
            seen.add(hit.image_id)
            out.append(hit)
        nxt = next(iters[i], None)
        if nxt is not None:
            heapq.heappush(heap, (sign * nxt.score, i, nxt))
    return out


def ids_by_shard(hits: Iterable[Hit]) -> dict[int, list[str]]:
    """Image ids grouped by owning shard, in hit order (for one batched call per shard)."""
    out: dict[int, list[str]] = {}
    for h in hits:
        out.setdefault(h.shard_id, []).append(h.image_id)
    return out
