"""Revisited Oxford/Paris evaluation, reproducing revisitop's ``compute_ap``/``compute_map``.

A numpy port of ``revisitop/python/evaluate.py`` (Radenović et al., CVPR 2018) that gives the
same floating-point results, bit for bit, on full rankings. Its rules, quirks included:

* Junk images are removed from the ranking before AP: each positive's 0-based position is
  lowered by the number of junk images ranked before it.
* AP is the trapezoid rule of ``compute_ap``: the positive found at (junk-free) rank ``r`` as
  the ``j``-th positive (both 0-based) adds ``(j / r + (j + 1) / (r + 1)) / 2 / nres``, with
  ``j / r`` read as 1 when ``r == 0``. ``nres`` is the *length* of the positive list, so a
  duplicated positive index counts twice in the denominator.
* A query with no positives is skipped: AP and P@k are NaN and it is left out of the means.
  (The official code divides by zero when every query is skipped; here mAP and mP@k are NaN.)
* mP@k quirk: with ``pos`` the 1-based junk-free ranks of the positives,
  ``k' = min(max(pos), k)`` and P@k = ``#(pos <= k') / k'``. When every positive is ranked
  within the top k, the precision is measured at the last positive instead of at k, so a
  query with 2 positives ranked 1st and 2nd has P@10 = 1.
* Means are accumulated query by query in query order, as the official loop does.

Partial rankings (e.g. only the top-k of each query) are completed before evaluation:
the unranked database images are appended after all ranked ones, in increasing database
index. This is deterministic, places every unranked positive at the bottom, and gives the
value a full ranking with that tail would get (the official code, fed a truncated ranking,
instead counts unranked positives as never found and measures P@k at the last *found*
positive).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.eval.ground_truth import GroundTruth

PROTOCOLS = ("easy", "medium", "hard")


@dataclass(frozen=True)
class MapResult:
    """Output of :func:`compute_map` (fractions in [0, 1], not percent).

    Attributes
    ----------
    map : float
        Mean AP over the non-skipped queries (NaN when all are skipped).
    aps : np.ndarray, (n_queries,)
        AP per query, NaN for skipped queries.
    mpr : np.ndarray, (n_kappas,)
        Mean precision at each kappa over the non-skipped queries.
    prs : np.ndarray, (n_queries, n_kappas)
        Precision at each kappa per query (official mP@k rule), NaN rows for skipped queries.
    kappas : tuple of int
        The cut-offs of ``mpr``/``prs`` columns.
    skipped : tuple of int
        Indices of the queries without positives.
    """

    map: float
    aps: np.ndarray
    mpr: np.ndarray
    prs: np.ndarray
    kappas: tuple[int, ...]
    skipped: tuple[int, ...]


def compute_ap(ranks: np.ndarray, nres: int) -> float:
    """Average precision from the sorted junk-free ranks of the retrieved positives.

    Parameters
    ----------
    ranks : array_like of int, (n_found,)
        0-based ranks of the positives in the ranking, ascending, junk already removed.
    nres : int
        Number of positives of the query (the recall denominator).

    Returns
    -------
    float
        AP by the official trapezoid rule (see the module docstring); positives missing from
        ``ranks`` contribute nothing.

    Raises
    ------
    ValueError
        ``nres < 1`` or ``ranks`` is not 1-D.
    """
    if nres < 1:
        raise ValueError(f"nres must be >= 1, got {nres}")
    r = np.asarray(ranks)
    if r.ndim != 1:
        raise ValueError(f"ranks must be 1-D, got shape {r.shape}")
    if r.size == 0:
        return 0.0
    r = r.astype(np.float64)
    j = np.arange(r.size, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision_0 = np.where(r == 0, 1.0, j / r)
    precision_1 = (j + 1.0) / (r + 1.0)
    terms = (precision_0 + precision_1) * (1.0 / nres) / 2.0
    # cumsum adds left to right like the official loop (np.sum would add pairwise).
    return float(np.cumsum(terms)[-1])


def complete_ranks(ranks: np.ndarray, n_db: int) -> np.ndarray:
    """Validate a (possibly partial) ranking and append the unranked images to each column.

    Parameters
    ----------
    ranks : array_like of int, (n_ranked, n_queries)
        Database indices, best first, distinct within a column; ``n_ranked <= n_db``.
    n_db : int
        Database size.

    Returns
    -------
    np.ndarray of int64, (n_db, n_queries)
        The ranking, followed in each column by the unranked indices in increasing order.

    Raises
    ------
    ValueError
        Wrong shape or dtype, an index outside ``[0, n_db)`` or repeated within a column.
    """
    r = np.asarray(ranks)
    if r.ndim != 2:
        raise ValueError(f"ranks must be 2-D (n_ranked, n_queries), got shape {r.shape}")
    if r.size and r.dtype.kind not in "iu":
        raise ValueError(f"ranks must hold integer indices, got dtype {r.dtype}")
    n_ranked, n_queries = r.shape
    if n_ranked > n_db:
        raise ValueError(f"ranks has {n_ranked} rows but the database has {n_db} images")
    r = r.astype(np.int64, copy=False)
    if r.size and (r.min() < 0 or r.max() >= n_db):
        raise ValueError(f"ranks holds indices outside [0, {n_db})")
    unranked = np.ones((n_queries, n_db), dtype=bool)
    unranked[np.arange(n_queries)[None, :], r] = False
    counts = n_db - unranked.sum(axis=1)
    dup = np.flatnonzero(counts != n_ranked)
    if dup.size:
        raise ValueError(f"ranks column {int(dup[0])} repeats a database index")
    if n_ranked == n_db:
        return r
    # Row-major nonzero walks each query's row in increasing index: the tails in order.
    tail = np.nonzero(unranked)[1].reshape(n_queries, n_db - n_ranked).T
    return np.concatenate([r, tail], axis=0)


def compute_map(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = (1, 5, 10),
    n_db: int | None = None,
) -> MapResult:
    """mAP and mP@k exactly as revisitop's ``compute_map``.

    Parameters
    ----------
    ranks : array_like of int, (n_ranked, n_queries)
        Column ``q`` lists database indices for query ``q``, best first.
    gnd : sequence of dict, (n_queries,)
        Per query ``'ok'`` (positive indices) and optionally ``'junk'`` (ignored indices).
    kappas : sequence of int
        Cut-offs for P@k, each >= 1.
    n_db : int, optional
        Database size; defaults to ``n_ranked`` (a full ranking). When larger, the ranking is
        completed by :func:`complete_ranks`.

    Returns
    -------
    MapResult

    Raises
    ------
    ValueError
        Malformed ranks, kappas or gnd (index outside the database, missing ``'ok'``).
    """
    kappas = tuple(int(k) for k in kappas)
    if any(k < 1 for k in kappas):
        raise ValueError(f"kappas must be >= 1, got {kappas}")
    r = np.asarray(ranks)
    if r.ndim != 2:
        raise ValueError(f"ranks must be 2-D (n_ranked, n_queries), got shape {r.shape}")
    n_db = r.shape[0] if n_db is None else int(n_db)
    if r.shape[1] != len(gnd):
        raise ValueError(f"ranks has {r.shape[1]} query columns but gnd has {len(gnd)} entries")
    r = complete_ranks(r, n_db)

    nq = len(gnd)
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    total_ap = 0.0
    total_pr = np.zeros(len(kappas))
    skipped = []
    for i in range(nq):
        ok = _gnd_indices(gnd[i], "ok", i, n_db, required=True)
        if ok.size == 0:
            aps[i] = np.nan
            prs[i, :] = np.nan
            skipped.append(i)
            continue
        junk = _gnd_indices(gnd[i], "junk", i, n_db, required=False)
        column = r[:, i]
        pos = np.flatnonzero(np.isin(column, ok))
        junk_pos = np.flatnonzero(np.isin(column, junk))
        # Each positive moves up by the number of junk images ranked strictly before it.
        pos = pos - np.searchsorted(junk_pos, pos, side="left")

        ap = compute_ap(pos, ok.size)
        aps[i] = ap
        total_ap = total_ap + ap

        pos1 = pos + 1  # 1-based
        last = int(pos1.max())
        for j, kappa in enumerate(kappas):
            kq = min(last, kappa)
            prs[i, j] = np.count_nonzero(pos1 <= kq) / kq
        total_pr = total_pr + prs[i, :]

    n_eval = nq - len(skipped)
    if n_eval == 0:
        mean_ap, mpr = float("nan"), np.full(len(kappas), np.nan)
    else:
        mean_ap, mpr = float(total_ap / n_eval), total_pr / n_eval
    return MapResult(map=mean_ap, aps=aps, mpr=mpr, prs=prs, kappas=kappas, skipped=tuple(skipped))


def protocol_gnd(
    gnd: GroundTruth | Sequence[Mapping[str, Any]], protocol: str
) -> list[dict[str, np.ndarray]]:
    """Positives/junk per query under a revisited protocol.

    Easy: ok = easy, junk = junk + hard. Medium: ok = easy + hard, junk = junk.
    Hard: ok = hard, junk = junk + easy. Lists are concatenated as given (no dedup), as the
    official example does.

    Parameters
    ----------
    gnd : GroundTruth or sequence of dict
        Entries with ``'easy'``, ``'hard'``, ``'junk'``.
    protocol : {'easy', 'medium', 'hard'}

    Returns
    -------
    list of dict
        ``{'ok': int64 array, 'junk': int64 array}`` per query.
    """
    entries = gnd.gnd if isinstance(gnd, GroundTruth) else gnd
    parts = {
        "easy": (("easy",), ("junk", "hard")),
        "medium": (("easy", "hard"), ("junk",)),
        "hard": (("hard",), ("junk", "easy")),
    }
    if protocol not in parts:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    ok_fields, junk_fields = parts[protocol]
    out = []
    for i, entry in enumerate(entries):
        for field in ("easy", "hard", "junk"):
            if field not in entry:
                raise ValueError(f"gnd[{i}] is missing field {field!r}")
        out.append(
            {
                "ok": np.concatenate([_as_int_array(entry[f]) for f in ok_fields]),
                "junk": np.concatenate([_as_int_array(entry[f]) for f in junk_fields]),
            }
        )
    return out


def evaluate_protocols(
    ranks: np.ndarray,
    gnd: GroundTruth | Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = (1, 5, 10),
    n_db: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Revisited Easy/Medium/Hard evaluation, in percent.

    Parameters
    ----------
    ranks : array_like of int, (n_ranked, n_queries)
        Database indices per query, best first; may be partial (see the module docstring).
    gnd : GroundTruth or sequence of dict
        Ground truth with ``'easy'``, ``'hard'``, ``'junk'`` per query.
    kappas : sequence of int
        Cut-offs for mP@k.
    n_db : int, optional
        Database size; defaults to ``len(gnd.imlist)`` for a :class:`GroundTruth`, else to
        ``n_ranked`` (full rankings).

    Returns
    -------
    dict
        ``{'easy' | 'medium' | 'hard': {'map': float, 'mp@1': float, ... (one per kappa),
        'aps': [float | None per query], 'skipped': [query indices]}}``, values in percent,
        ``None`` where no query (or, in ``aps``, that query) has positives. JSON-serialisable.
    """
    if n_db is None and isinstance(gnd, GroundTruth):
        n_db = gnd.n_db
    report: dict[str, dict[str, Any]] = {}
    for protocol in PROTOCOLS:
        res = compute_map(ranks, protocol_gnd(gnd, protocol), kappas, n_db=n_db)
        entry: dict[str, Any] = {"map": _percent(res.map)}
        for kappa, value in zip(res.kappas, res.mpr, strict=True):
            entry[f"mp@{kappa}"] = _percent(value)
        entry["aps"] = [_percent(ap) for ap in res.aps]
        entry["skipped"] = list(res.skipped)
        report[protocol] = entry
    return report


def _percent(value: float) -> float | None:
    return None if np.isnan(value) else 100.0 * float(value)


def _as_int_array(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.int64).reshape(-1)


def _gnd_indices(
    entry: Mapping[str, Any], field: str, i: int, n_db: int, *, required: bool
) -> np.ndarray:
    if field not in entry:
        if required:
            raise ValueError(f"gnd[{i}] is missing field {field!r}")
        return np.zeros(0, dtype=np.int64)
    try:
        idx = _as_int_array(entry[field])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"gnd[{i}].{field} must be integer indices") from exc
    if idx.size and (idx.min() < 0 or idx.max() >= n_db):
        raise ValueError(f"gnd[{i}].{field} holds indices outside [0, {n_db})")
    return idx
