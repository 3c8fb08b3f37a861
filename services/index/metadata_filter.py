"""Metadata filters in a shard: an in-RAM inverted index over every metadata entry.

``MetadataIndex`` maps key → value → set of store labels, and answers a ``loupe.v1.Filter``
with the sorted labels of the images that match it (equality and set membership by posting
lookup, ranges by binary search over the key's numeric values, conditions intersected).

Built lazily, on a shard's first filtered call, from the store's ``info`` records; from then on
kept in step with every write under the shard's write lock (read-your-writes for filters too).

RAM bound: one Python int in one set per (image, metadata entry), ~70-100 bytes in CPython,
plus each distinct (key, value) string once and, per key used in a range, two numpy arrays
(16 bytes per image with a numeric value). E.g. 1M images with 4 metadata entries each:
~400 MB. A shard that never gets a filtered request never builds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from loupe.v1 import types_pb2
from services.common.limits import check_filter, parse_filter_number

_EMPTY = np.zeros(0, np.int64)


@dataclass(frozen=True)
class CompiledCondition:
    """One validated condition: ``kind`` in equals/any_of/range."""

    key: str
    kind: str
    values: tuple[str, ...] = ()
    lo: float = -np.inf
    hi: float = np.inf
    lo_open: bool = False
    hi_open: bool = False


def compile_filter(flt: types_pb2.Filter, field: str = "filter") -> list[CompiledCondition]:
    """Validate a Filter message (InvalidArgument naming the field) and compile it."""
    check_filter(flt, field)
    out = []
    for c in flt.all:
        which = c.WhichOneof("test")
        if which == "equals":
            out.append(CompiledCondition(c.key, "any_of", (c.equals,)))
        elif which == "any_of":
            out.append(CompiledCondition(c.key, "any_of", tuple(c.any_of.values)))
        else:
            r = c.range
            lo = parse_filter_number(r.min) if r.min else -np.inf
            hi = parse_filter_number(r.max) if r.max else np.inf
            out.append(CompiledCondition(c.key, "range", (), lo, hi, r.min_exclusive, r.max_exclusive))
    return out


class MetadataIndex:
    """key → value → labels, for the images of one shard."""

    def __init__(self) -> None:
        self.postings: dict[str, dict[str, set[int]]] = {}
        self._numeric: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # key → (sorted numbers, their labels)

    def add(self, label: int, metadata: Mapping[str, str]) -> None:
        """Index one image's metadata."""
        for key, value in metadata.items():
            self.postings.setdefault(key, {}).setdefault(value, set()).add(label)
            self._numeric.pop(key, None)

    def remove(self, label: int, metadata: Mapping[str, str]) -> None:
        """Forget one image's metadata (as it was indexed)."""
        for key, value in metadata.items():
            values = self.postings.get(key)
            if values is None or value not in values:
                continue
            values[value].discard(label)
            if not values[value]:
                del values[value]
                if not values:
                    del self.postings[key]
            self._numeric.pop(key, None)

    def _numbers(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        cached = self._numeric.get(key)
        if cached is None:
            nums: list[float] = []
            labels: list[int] = []
            for value, ls in self.postings.get(key, {}).items():
                try:
                    x = parse_filter_number(value)
                except ValueError:
                    continue
                nums.extend([x] * len(ls))
                labels.extend(ls)
            n, l = np.asarray(nums, np.float64), np.asarray(labels, np.int64)
            order = np.argsort(n, kind="stable")
            cached = self._numeric[key] = (n[order], l[order])
        return cached

    def _one(self, c: CompiledCondition) -> np.ndarray:
        if c.kind == "any_of":
            values = self.postings.get(c.key, {})
            found: set[int] = set()
            for v in c.values:
                found |= values.get(v, set())
            return np.fromiter(found, np.int64, len(found))
        nums, labels = self._numbers(c.key)
        start = np.searchsorted(nums, c.lo, side="right" if c.lo_open else "left")
        end = np.searchsorted(nums, c.hi, side="left" if c.hi_open else "right")
        return labels[start:end] if end > start else _EMPTY

    def match(self, conditions: Iterable[CompiledCondition]) -> np.ndarray:
        """Sorted (n,) int64 labels of the images satisfying every condition."""
        out: np.ndarray | None = None
        for c in conditions:
            got = np.unique(self._one(c))
            out = got if out is None else np.intersect1d(out, got, assume_unique=True)
            if not len(out):
                return _EMPTY
        return _EMPTY if out is None else out
