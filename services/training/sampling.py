"""Training-set bookkeeping and batch sampling (numpy only, no model).

Labels are integer class ids ``(N,)`` (:func:`encode_labels`); in instance mode every image is
its own class. Every sampler takes a ``numpy.random.Generator`` so a seed fixes the batches.

- :func:`sample_npair` — N-pair batches: ``n`` distinct classes x 2 images.
- :func:`mine_hard_negatives` — for each query, the pool images most similar to it under the
  current model whose class differs from the query's and from each other's (cirtorch's rule),
  re-mined every epoch from fresh descriptors.
- :func:`sample_positives` — a random other image of the query's class (itself when alone:
  instance mode, where the two augmentations make the pair).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def encode_labels(labels: Sequence[str]) -> np.ndarray:
    """Class ids in order of first appearance: ``(N,) str -> (N,) int64``."""
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(lab, len(ids)) for lab in labels], dtype=np.int64)


def holdout_split(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``round(fraction * n_c)`` random images of each class, keeping at least 2 for
    training (at least 1 for singleton classes, which are held out whole with probability
    ``fraction``: instance mode).

    Parameters
    ----------
    labels : ndarray ``(N,)`` int
    fraction : float
        In ``[0, 1)``.

    Returns
    -------
    (train, val) : ndarray ``(N_t,)``, ndarray ``(N_v,)``
        Sorted image indices, disjoint, covering ``0..N-1``.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    val = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        if len(members) == 1:
            if rng.random() < fraction:
                val.append(members)
            continue
        k = min(int(round(fraction * len(members))), len(members) - 2)
        val.append(members[:k])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def sample_npair(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """One N-pair batch: ``n`` distinct classes, two distinct images of each (the same image
    twice for a singleton class, to be augmented twice).

    Parameters
    ----------
    labels : ndarray ``(N,)`` int
    n : int
        Number of classes, ``>= 2``.

    Returns
    -------
    ndarray ``(n, 2)`` int64
        Row ``i`` is (anchor, positive) image indices of class ``i``.
    """
    classes = np.unique(labels)
    if n < 2 or n > len(classes):
        raise ValueError(f"an N-pair batch needs 2 <= n <= {len(classes)} classes, got n={n}")
    out = np.empty((n, 2), dtype=np.int64)
    for row, c in enumerate(rng.choice(classes, size=n, replace=False)):
        members = np.flatnonzero(labels == c)
        out[row] = members[0] if len(members) == 1 else rng.choice(members, size=2, replace=False)
    return out


def sample_positives(labels: np.ndarray, queries: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random image of each query's class other than the query (the query itself if alone).

    ``labels (N,), queries (Q,) -> (Q,)`` int64 image indices.
    """
    out = np.empty(len(queries), dtype=np.int64)
    for k, q in enumerate(queries):
        others = np.flatnonzero(labels == labels[q])
        others = others[others != q]
        out[k] = q if len(others) == 0 else rng.choice(others)
    return out


def mine_hard_negatives(
    query_desc: np.ndarray,
    query_labels: np.ndarray,
    pool_desc: np.ndarray,
    pool_labels: np.ndarray,
    n_neg: int,
) -> np.ndarray:
    """Hardest negatives for each query from a pool, at most one per class (cirtorch).

    Pool images are ranked by descending similarity ``pool_desc @ query``; an image is taken
    when its class is neither the query's nor that of a negative already taken.

    Parameters
    ----------
    query_desc : ndarray ``(Q, D)``
        L2-normalised descriptors of the queries under the current model.
    query_labels : ndarray ``(Q,)`` int
    pool_desc : ndarray ``(P, D)``
        L2-normalised descriptors of the negative pool.
    pool_labels : ndarray ``(P,)`` int
    n_neg : int
        Negatives per query.

    Returns
    -------
    ndarray ``(Q, n_neg)`` int64
        Indices into the pool, hardest first.
    """
    if query_desc.ndim != 2 or pool_desc.ndim != 2 or query_desc.shape[1] != pool_desc.shape[1]:
        raise ValueError(
            f"descriptors must be (Q, D) and (P, D); got {query_desc.shape} and {pool_desc.shape}"
        )
    if len(query_labels) != len(query_desc) or len(pool_labels) != len(pool_desc):
        raise ValueError("one label per descriptor is required")
    n_classes = len(np.unique(pool_labels))
    out = np.empty((len(query_desc), n_neg), dtype=np.int64)
    order = np.argsort(-(query_desc @ pool_desc.T), axis=1, kind="stable")
    for k, ranking in enumerate(order):
        taken: set[int] = {int(query_labels[k])}
        found = 0
        for j in ranking:
            c = int(pool_labels[j])
            if c not in taken:
                taken.add(c)
                out[k, found] = j
                found += 1
                if found == n_neg:
                    break
        if found < n_neg:
            raise ValueError(
                f"need {n_neg} negatives of distinct classes other than the query's, but the "
                f"pool has only {n_classes} classes"
            )
    return out
