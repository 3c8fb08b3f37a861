"""Tests for services.eval.revisitop and services.eval.ground_truth."""

from __future__ import annotations

import datetime
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from services.eval.ground_truth import (
    GroundTruth,
    GroundTruthError,
    load_ground_truth,
    parse_ground_truth,
)
from services.eval.revisitop import (
    complete_ranks,
    compute_ap,
    compute_map,
    evaluate_protocols,
    protocol_gnd,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "roxford5k_subset"
GND_PKL = DATA / "gnd_roxford5k_subset.pkl"


def _column(*ids: int) -> np.ndarray:
    """A single-query (n, 1) ranking."""
    return np.array(ids, dtype=np.int64)[:, None]


def _loop_reference_map(ranks, gnd, kappas):
    """Independent plain-Python restatement of revisitop's evaluate.py, the oracle."""
    n_rows, nq = ranks.shape
    total, total_pr, n_empty = 0.0, np.zeros(len(kappas)), 0
    aps = []
    for q in range(nq):
        ok = list(gnd[q]["ok"])
        if not ok:
            n_empty += 1
            aps.append(float("nan"))
            continue
        junk = set(gnd[q].get("junk", []))
        ok_set = set(ok)
        positions, n_junk_seen = [], 0
        for pos in range(n_rows):
            item = ranks[pos, q]
            if item in ok_set:
                positions.append(pos - n_junk_seen)
            if item in junk:
                n_junk_seen += 1
        ap = 0
        for j, r in enumerate(positions):
            p0 = 1.0 if r == 0 else float(j) / r
            p1 = float(j + 1) / (r + 1)
            ap += (p0 + p1) * (1.0 / len(ok)) / 2.0
        aps.append(ap)
        total = total + ap
        one_based = [p + 1 for p in positions]
        row = []
        for k in kappas:
            kq = min(max(one_based), k)
            row.append(sum(p <= kq for p in one_based) / kq)
        total_pr = total_pr + np.array(row)
    return total / (nq - n_empty), np.array(aps), total_pr / (nq - n_empty)


# ----------------------------------------------------------------------------- compute_ap


def test_compute_ap_hand_computed():
    # Positives at 0-based ranks 0 and 2, 2 positives:
    #   j=0, r=0: (1 + 1/1) / 2 / 2   = 1/2
    #   j=1, r=2: (1/2 + 2/3) / 2 / 2 = 7/24       -> AP = 19/24
    assert compute_ap(np.array([0, 2]), 2) == pytest.approx(19 / 24, abs=1e-15)
    # Positives at 1 and 3: (0/1 + 1/2)/4 + (1/3 + 2/4)/4 = 1/8 + 5/24 = 1/3
    assert compute_ap(np.array([1, 3]), 2) == pytest.approx(1 / 3, abs=1e-15)


def test_compute_ap_missing_positive_contributes_nothing():
    # 3 positives, only one retrieved, at rank 0: (1 + 1) / 2 / 3 = 1/3
    assert compute_ap(np.array([0]), 3) == pytest.approx(1 / 3, abs=1e-15)
    assert compute_ap(np.array([], dtype=np.int64), 3) == 0.0


def test_compute_ap_rejects_bad_input():
    with pytest.raises(ValueError, match="nres"):
        compute_ap(np.array([0]), 0)
    with pytest.raises(ValueError, match="1-D"):
        compute_ap(np.zeros((2, 2), dtype=int), 2)


# ----------------------------------------------------------------------------- compute_map


def test_junk_is_removed_before_ap():
    # Ranking 9(junk) 1(pos) 5 2(pos) 7 ...: positives at 1 and 3 become 0 and 2 -> 19/24.
    ranks = _column(9, 1, 5, 2, 7, 0, 3, 4, 6, 8)
    res = compute_map(ranks, [{"ok": [1, 2], "junk": [9]}], kappas=())
    assert res.map == pytest.approx(19 / 24, abs=1e-15)
    # Without the junk declaration: 1/3 (second hand case of test_compute_ap_hand_computed).
    res = compute_map(ranks, [{"ok": [1, 2]}], kappas=())
    assert res.map == pytest.approx(1 / 3, abs=1e-15)


def test_query_without_positives_is_skipped():
    ranks = np.stack([np.arange(6), np.arange(6)], axis=1)
    gnd = [{"ok": [0], "junk": []}, {"ok": [], "junk": [1]}]
    res = compute_map(ranks, gnd, kappas=(1, 5))
    assert res.skipped == (1,)
    assert np.isnan(res.aps[1]) and np.isnan(res.prs[1]).all()
    assert res.map == 1.0  # the mean is over query 0 only
    np.testing.assert_array_equal(res.mpr, [1.0, 1.0])


def test_all_queries_skipped_gives_nan():
    res = compute_map(_column(0, 1), [{"ok": []}], kappas=(1,))
    assert np.isnan(res.map) and np.isnan(res.mpr).all()
    assert res.skipped == (0,)


def test_mp_at_k_quirk():
    # 2 positives at 1-based ranks 1 and 2: k' = min(max(pos), 10) = 2 -> P@10 = 2/2 = 1,
    # not 2/10.
    ranks = _column(*range(20))
    res = compute_map(ranks, [{"ok": [0, 1]}], kappas=(1, 5, 10))
    np.testing.assert_array_equal(res.prs[0], [1.0, 1.0, 1.0])
    # Positives at 1-based 2 and 7: P@1 = 0/1, P@5 = 1/5 (k'=5), P@10 = 2/7 (k'=7).
    res = compute_map(ranks, [{"ok": [1, 6]}], kappas=(1, 5, 10))
    np.testing.assert_allclose(res.prs[0], [0.0, 1 / 5, 2 / 7], rtol=0, atol=1e-15)


def test_mp_at_k_counts_after_junk_removal():
    # Junk 0 and 1 on top; positives at 1-based 3 and 4 move to 1 and 2: P@5 = 2/2 = 1.
    ranks = _column(*range(10))
    res = compute_map(ranks, [{"ok": [2, 3], "junk": [0, 1]}], kappas=(1, 5))
    np.testing.assert_array_equal(res.prs[0], [1.0, 1.0])
    assert res.map == 1.0


def test_duplicate_positive_counts_in_denominator():
    # Official nres = len(ok): a repeated index halves the AP of a perfect ranking.
    res = compute_map(_column(0, 1, 2), [{"ok": [0, 0]}], kappas=())
    assert res.map == pytest.approx(0.5, abs=1e-15)


def test_matches_loop_reference_bit_for_bit():
    rng = np.random.default_rng(7)
    n_db, nq = 60, 12
    ranks = np.stack([rng.permutation(n_db) for _ in range(nq)], axis=1)
    gnd = []
    for q in range(nq):
        ids = rng.permutation(n_db)
        n_ok = int(rng.integers(0, 8))
        ok = ids[:n_ok]
        junk = ids[n_ok : n_ok + int(rng.integers(0, 6))]
        if q % 4 == 3 and n_ok:  # overlapping ok/junk and a duplicate positive
            junk = np.concatenate([junk, ok[:1]])
            ok = np.concatenate([ok, ok[:1]])
        gnd.append({"ok": ok, "junk": junk})
    kappas = (1, 3, 5, 10)
    res = compute_map(ranks, gnd, kappas)
    ref_map, ref_aps, ref_mpr = _loop_reference_map(ranks, gnd, kappas)
    assert res.map == ref_map
    np.testing.assert_array_equal(res.aps, ref_aps)
    np.testing.assert_array_equal(res.mpr, ref_mpr)


def test_partial_ranking_is_completed_in_index_order():
    completed = complete_ranks(np.array([[3, 0], [1, 4]]), n_db=5)
    np.testing.assert_array_equal(completed[:, 0], [3, 1, 0, 2, 4])
    np.testing.assert_array_equal(completed[:, 1], [0, 4, 1, 2, 3])
    # Top-2 of a 5-image database; positive 4 is unranked and lands at 0-based rank 4:
    # (1 + 1)/2/2 + (1/4 + 2/5)/2/2 = 1/2 + 13/80
    res = compute_map(np.array([[0], [1]]), [{"ok": [0, 4]}], kappas=(10,), n_db=5)
    assert res.map == pytest.approx(1 / 2 + 13 / 80, abs=1e-15)
    assert res.prs[0, 0] == pytest.approx(2 / 5)  # k' = min(5, 10): both positives counted


def test_invalid_rankings_are_rejected():
    with pytest.raises(ValueError, match="repeats"):
        complete_ranks(np.array([[0], [0]]), n_db=3)
    with pytest.raises(ValueError, match="outside"):
        complete_ranks(np.array([[5]]), n_db=3)
    with pytest.raises(ValueError, match="integer"):
        complete_ranks(np.array([[0.0]]), n_db=3)
    with pytest.raises(ValueError, match="query columns"):
        compute_map(np.zeros((3, 2), dtype=int), [{"ok": [0]}])
    with pytest.raises(ValueError, match=r"gnd\[0\]\.ok"):
        compute_map(_column(0, 1, 2), [{"ok": [7]}])
    with pytest.raises(ValueError, match="kappas"):
        compute_map(_column(0, 1, 2), [{"ok": [0]}], kappas=(0,))


# ---------------------------------------------------------------------- protocols and gnd


def _toy_gnd() -> GroundTruth:
    return parse_ground_truth(
        {
            "imlist": [f"db{i}" for i in range(8)],
            "qimlist": ["q0", "q1"],
            "gnd": [
                {"bbx": [1.4, 2.6, 10.5, 20.0], "easy": [0], "hard": [1], "junk": [2]},
                {"bbx": [0, 0, 5, 5], "easy": [], "hard": [3], "junk": []},
            ],
        }
    )


def test_protocol_definitions():
    gt = _toy_gnd()
    easy, medium, hard = (protocol_gnd(gt, p)[0] for p in ("easy", "medium", "hard"))
    assert sorted(easy["ok"]) == [0] and sorted(easy["junk"]) == [1, 2]
    assert sorted(medium["ok"]) == [0, 1] and sorted(medium["junk"]) == [2]
    assert sorted(hard["ok"]) == [1] and sorted(hard["junk"]) == [0, 2]
    with pytest.raises(ValueError, match="protocol"):
        protocol_gnd(gt, "extreme")


def test_evaluate_protocols_percent_and_skips():
    gt = _toy_gnd()
    # Query 0 ranks 1 (hard) first, then 0 (easy); query 1 ranks 3 first. Top-2 only.
    ranks = np.array([[1, 3], [0, 0]])
    report = evaluate_protocols(ranks, gt)
    # Easy: q0 positive 0 after junk 1 removed -> rank 0 -> 100; q1 has no easy -> skipped.
    assert report["easy"]["map"] == pytest.approx(100.0)
    assert report["easy"]["aps"] == [pytest.approx(100.0), None]
    assert report["easy"]["skipped"] == [1]
    # Medium: both queries perfect.
    assert report["medium"]["map"] == pytest.approx(100.0)
    assert report["medium"]["mp@1"] == pytest.approx(100.0)
    json.dumps(report)  # serialisable


def test_load_ground_truth_json_and_pkl(tmp_path):
    raw = {
        "imlist": ["a", "b", "c"],
        "qimlist": ["q"],
        "gnd": [{"bbx": [0.0, 0.0, 3.0, 4.0], "easy": [0], "hard": [2], "junk": [1]}],
    }
    (tmp_path / "g.json").write_text(json.dumps(raw))
    as_arrays = {**raw, "gnd": [{k: np.asarray(v) for k, v in raw["gnd"][0].items()}]}
    (tmp_path / "g.pkl").write_bytes(pickle.dumps(as_arrays))
    for name in ("g.json", "g.pkl"):
        gt = load_ground_truth(tmp_path / name)
        assert gt.imlist == ["a", "b", "c"] and gt.n_queries == 1
        assert gt.gnd[0]["bbx"] == (0.0, 0.0, 3.0, 4.0)
        np.testing.assert_array_equal(gt.gnd[0]["junk"], [1])


def test_unreadable_files_are_refused(tmp_path):
    (tmp_path / "g.txt").write_text("{}")
    with pytest.raises(GroundTruthError, match="unsupported extension"):
        load_ground_truth(tmp_path / "g.txt")
    (tmp_path / "g.json").write_text("{not json")
    with pytest.raises(GroundTruthError, match="invalid JSON"):
        load_ground_truth(tmp_path / "g.json")


def test_pickle_with_foreign_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"imlist": [datetime.date(2020, 1, 1)]}))
    with pytest.raises(GroundTruthError, match="datetime"):
        load_ground_truth(path)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda g: g.pop("qimlist"), "qimlist"),
        (lambda g: g["gnd"][0].pop("junk"), r"gnd\[0\] is missing field 'junk'"),
        (lambda g: g["gnd"][0].update(hard=[0, 9]), r"gnd\[0\]\.hard\[1\]"),
        (lambda g: g["gnd"][0].update(easy=[1.5]), r"gnd\[0\]\.easy\[0\]"),
        (lambda g: g["gnd"][0].update(bbx=[0, 0, 1]), r"gnd\[0\]\.bbx"),
        (lambda g: g["gnd"][0].update(bbx=[5, 0, 1, 1]), r"gnd\[0\]\.bbx"),
        (lambda g: g["imlist"].append(3), r"imlist\[2\]"),
        (lambda g: g["gnd"].append(g["gnd"][0]), "2 entries"),
    ],
)
def test_validation_names_the_field(mutate, message):
    raw = {
        "imlist": ["a", "b"],
        "qimlist": ["q"],
        "gnd": [{"bbx": [0, 0, 2, 2], "easy": [0], "hard": [], "junk": [1]}],
    }
    mutate(raw)
    with pytest.raises(GroundTruthError, match=message):
        parse_ground_truth(raw)


def test_roxford_subset_perfect_reversed_and_random():
    if not GND_PKL.exists():
        pytest.skip(f"evaluation data absent: {GND_PKL} (see ../shared/data/README.md)")
    gt = load_ground_truth(GND_PKL)
    assert (gt.n_db, gt.n_queries) == (996, 9)

    columns = []
    for entry in gt.gnd:
        first = np.concatenate([entry["easy"], entry["hard"]])
        rest = np.setdiff1d(np.arange(gt.n_db), first)
        columns.append(np.concatenate([first, rest]))
    perfect = np.stack(columns, axis=1)
    report = evaluate_protocols(perfect, gt)
    for protocol in ("easy", "medium", "hard"):
        assert report[protocol]["map"] == pytest.approx(100.0)
        assert report[protocol]["mp@1"] == pytest.approx(100.0)
    assert 2 in report["medium"]["skipped"]  # balliol_000187 has no positives
    assert report["medium"]["aps"][2] is None

    assert evaluate_protocols(perfect[::-1], gt)["medium"]["map"] < 5.0
    rng = np.random.default_rng(0)
    random_ranks = np.stack([rng.permutation(gt.n_db) for _ in range(gt.n_queries)], axis=1)
    assert evaluate_protocols(random_ranks, gt)["medium"]["map"] < 10.0
    # A top-100 slice of the perfect ranking is completed and still scores 100.
    assert evaluate_protocols(perfect[:100], gt)["medium"]["map"] == pytest.approx(100.0)
