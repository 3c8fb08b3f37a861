"""Shard-side pieces of the public API (issue 13) on a real store + faiss, no network:
metadata filters before the top-k (exact and approximate index), the id-ordered listing
under concurrent writes, batched searches, stored-info lookups."""

from __future__ import annotations

import numpy as np
import pytest

from loupe.v1 import types_pb2
from services.common.errors import InvalidArgument
from services.index.metadata_filter import MetadataIndex, compile_filter
from services.index.shard_index import ShardIndex
from services.index.store import ShardStore, StoredImage
from services.index.vector_index import IndexSettings

D = 16


def _vec(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(D).astype(np.float32)
    return v / np.linalg.norm(v)


def _filter(**conds) -> types_pb2.Filter:
    f = types_pb2.Filter()
    for key, test in conds.items():
        c = f.all.add(key=key)
        if isinstance(test, str):
            c.equals = test
        elif isinstance(test, list):
            c.any_of.values.extend(test)
        else:
            c.range.CopyFrom(test)
    return f


@pytest.fixture()
def index(tmp_path):
    idx = ShardIndex(ShardStore(str(tmp_path / "s")), IndexSettings(factory="Flat"), background=False)
    rng = np.random.default_rng(0)
    idx.add([
        StoredImage(f"img-{i:04d}", _vec(rng), None, None,
                    {"customer": f"c{i % 100}", "year": str(2000 + i % 25), "taken": f"20{10 + i % 10}-06-01", "odd": str(i % 2)})
        for i in range(1000)
    ])
    yield idx
    idx.close()


def _brute(idx: ShardIndex, q: np.ndarray, ids: list[str], k: int) -> list[str]:
    scored = sorted(((float(idx.get(i).vector @ q), i) for i in ids), reverse=True)
    return [i for _, i in scored[:k]]


def test_selective_filter_returns_k_exact_results(index):
    q = _vec(np.random.default_rng(1))
    conds = compile_filter(_filter(customer="c7"))  # 1 % of the shard: 10 images
    hits = index.search(q, 5, conditions=conds)
    wanted = [f"img-{i:04d}" for i in range(7, 1000, 100)]
    assert hits.ids == _brute(index, q, wanted, 5)
    assert all(md["customer"] == "c7" for md in hits.metadata)
    assert len(index.search(q, 50, conditions=conds).ids) == 10  # all that match, no more


def test_any_of_range_and_dates_intersect(index):
    q = _vec(np.random.default_rng(2))
    f = _filter(customer=["c35", "c37", "c60"], year=types_pb2.Range(min="2010", max="2015", max_exclusive=True),
                taken=types_pb2.Range(min="2015-01-01"))
    hits = index.search(q, 1000, conditions=compile_filter(f))
    want = [f"img-{i:04d}" for i in range(1000) if i % 100 in (35, 37, 60) and 10 <= i % 25 < 15 and i % 10 >= 5]
    assert sorted(hits.ids) == sorted(want) and want
    assert index.search(q, 10, conditions=compile_filter(_filter(nokey="x"))).ids == []  # unknown key: empty answer
    assert index.search(q, 10, conditions=compile_filter(_filter(customer=types_pb2.Range(min="1")))).ids == []  # not numeric


@pytest.mark.parametrize("f, field", [
    (_filter(customer=types_pb2.Range(min="5", max="4")), "filter.all[0].range"),
    (_filter(customer=types_pb2.Range(min="5", max="5", min_exclusive=True)), "filter.all[0].range"),
    (_filter(customer=types_pb2.Range(min="soon")), "filter.all[0].range.min"),
    (_filter(customer=types_pb2.Range()), "filter.all[0].range"),
    (_filter(customer=[]), "filter.all[0].any_of"),
    (types_pb2.Filter(all=[types_pb2.Condition(key="x")]), "filter.all[0]"),
    (types_pb2.Filter(all=[types_pb2.Condition(key="", equals="x")]), "filter.all[0].key"),
])
def test_bad_filters_name_the_field(f, field):
    with pytest.raises(InvalidArgument, match=field.replace("[", r"\[").replace("]", r"\]")):
        compile_filter(f)


def test_filters_follow_replaces_and_deletes(index):
    q = _vec(np.random.default_rng(3))
    conds = compile_filter(_filter(customer="c7"))
    assert len(index.search(q, 100, conditions=conds).ids) == 10
    index.add([StoredImage("img-0007", _vec(np.random.default_rng(4)), None, None, {"customer": "c8"})])  # replaced: metadata not merged
    index.delete(["img-0107"])
    ids = index.search(q, 100, conditions=conds).ids
    assert len(ids) == 8 and "img-0007" not in ids and "img-0107" not in ids
    assert "img-0007" in index.search(q, 100, conditions=compile_filter(_filter(customer="c8"))).ids
    assert index.search(q, 100, conditions=compile_filter(_filter(year="2007"))).ids.count("img-0007") == 0  # old metadata gone


def test_approximate_index_filter_exact_fallback_and_selector(tmp_path):
    rng = np.random.default_rng(5)
    settings = IndexSettings(factory="IVF16,Flat", approx_min_images=2000, train_sample=1000, nprobe=1, shortlist=10, filter_exact_max=50)
    idx = ShardIndex(ShardStore(str(tmp_path / "a")), settings, background=False)
    try:
        idx.add([StoredImage(f"a{i:05d}", _vec(rng), None, None, {"g": str(i % 40), "half": str(i % 2)}) for i in range(2400)])
        assert idx.factory == "IVF16,Flat"
        q = _vec(rng)
        # 60 images (2.5 %) match: above filter_exact_max, and nprobe=1 probes ~1/16 of them: exact fallback
        hits = idx.search(q, 30, conditions=compile_filter(_filter(g="3")))
        assert hits.ids == _brute(idx, q, [f"a{i:05d}" for i in range(3, 2400, 40)], 30)
        # half the shard: the selector-restricted IVF search returns k results, all matching
        hits = idx.search(q, 20, conditions=compile_filter(_filter(half="1")))
        assert len(hits.ids) == 20 and all(int(i[1:]) % 2 == 1 for i in hits.ids)
    finally:
        idx.close()


def test_search_many_matches_single_searches(index):
    rng = np.random.default_rng(6)
    qs = [_vec(rng) for _ in range(5)]
    batch = index.search_many([(q, 3 + i, False, False, None) for i, q in enumerate(qs)] + [(np.ones(3, np.float32), 3, False, False, None)])
    for i, q in enumerate(qs):
        assert batch[i].ids == index.search(q, 3 + i).ids
    assert isinstance(batch[-1], ValueError)


def test_listing_in_id_order_under_concurrent_writes(index):
    seen: list[str] = []
    after, page = "", 0
    rng = np.random.default_rng(7)
    while True:
        infos, done, last = index.list_ids(after, 64, None, 64)
        seen.extend(i.image_id for i in infos)
        if done:
            break
        after = last
        page += 1
        # between pages: add ids before and after the cursor, delete some not yet seen, replace seen ones
        index.add([StoredImage(f"img-{page:04d}-new", _vec(rng), None, None, {}), StoredImage("aaa-before", _vec(rng), None, None, {})])
        index.add([StoredImage(seen[0], _vec(rng), None, None, {"replaced": "1"})])
        index.delete([f"img-{999 - page:04d}"])
    assert seen == sorted(seen) and len(seen) == len(set(seen))  # no repeats, in order
    throughout = {f"img-{i:04d}" for i in range(1000)} - {f"img-{999 - p:04d}" for p in range(1, page + 1)}
    assert throughout <= set(seen)  # nothing that existed throughout was skipped
    assert "aaa-before" not in seen


def test_filtered_listing_bounded_scan(index):
    conds = compile_filter(_filter(customer="c5"))
    got, after, calls = [], "", 0
    while True:
        infos, done, last = index.list_ids(after, 4, conds, 100)
        calls += 1
        got.extend(i.image_id for i in infos)
        if done:
            break
        after = last
    assert got == [f"img-{i:04d}" for i in range(5, 1000, 100)] and calls >= 10


def test_get_infos_and_missing(index):
    found = index.get_infos(["img-0003", "nope"], want_vector=True)
    info, vec = found[0]
    assert info.image_id == "img-0003" and info.metadata["customer"] == "c3" and vec.shape == (D,)
    np.testing.assert_allclose(vec, index.get("img-0003").vector)
    assert found[1] is None


def test_metadata_index_unit():
    m = MetadataIndex()
    m.add(1, {"a": "x", "n": "3"})
    m.add(2, {"a": "y", "n": "2020-01-01"})
    m.remove(1, {"a": "x", "n": "3"})
    assert m.match(compile_filter(_filter(a="x"))).tolist() == []
    assert m.match(compile_filter(_filter(n=types_pb2.Range(min="2019-12-31T23:00:00Z")))).tolist() == [2]


def test_an_id_twice_in_one_write_leaves_one_filter_entry(index):
    rng = np.random.default_rng(8)
    conds = compile_filter(_filter(dup="yes"))
    index.search(_vec(rng), 1, conditions=conds)  # builds the metadata index first
    index.add([StoredImage("dup", _vec(rng), None, None, {"dup": "yes"}), StoredImage("dup", _vec(rng), None, None, {"dup": "yes"})])
    assert index.search(_vec(rng), 10, conditions=conds).ids == ["dup"]
    assert len(index._meta.match(conds)) == 1
