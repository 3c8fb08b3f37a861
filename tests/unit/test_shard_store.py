"""The shard's store and index: durable records, snapshots + replay, corruption, compaction,
the approximate index (real LMDB and faiss in a temp directory)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from services.index.shard_index import SNAPSHOT_FILE, ShardIndex
from services.index.store import LocalStore, ShardStore, StoreCorrupt, StoredImage
from services.index.vector_index import IndexSettings
from services.space.ann import ivfpq_factory

D = 32


def record(i: int, *, regions: int = 2, local: bool = True, dim: int = D, md: dict | None = None) -> StoredImage:
    rng = np.random.default_rng(i)
    v = rng.standard_normal(dim).astype(np.float32)
    reg = rng.standard_normal((regions, dim)).astype(np.float16) if regions else None
    loc = LocalStore.quantize(rng.random((7, 4)) * 100, rng.standard_normal((7, 8))) if local else None
    return StoredImage(f"img-{i}", v / np.linalg.norm(v), reg, loc, md if md is not None else {"n": str(i)}, 640, 480)


def exact_top(vecs: dict[str, np.ndarray], q: np.ndarray, k: int) -> list[str]:
    ids = list(vecs)
    m = np.stack([vecs[i] / np.linalg.norm(vecs[i]) for i in ids])
    return [ids[j] for j in np.argsort(-(m @ q), kind="stable")[:k]]


def open_index(path, **settings) -> ShardIndex:
    return ShardIndex(ShardStore(str(path)), IndexSettings(**settings), background=False)


def test_records_round_trip_replace_and_delete(tmp_path):
    idx = open_index(tmp_path)
    assert idx.add([record(i) for i in range(5)]) == 5
    got = idx.get("img-3")
    want = record(3)
    np.testing.assert_array_equal(got.vector, want.vector)
    np.testing.assert_array_equal(got.regional, want.regional)
    np.testing.assert_array_equal(got.local.descriptors, want.local.descriptors)
    assert got.local.scale == pytest.approx(want.local.scale)
    assert (got.metadata, got.width, got.height) == ({"n": "3"}, 640, 480)
    assert idx.get("img-3", regional=False, local=False).regional is None
    # replace: same id, new content; counters follow
    idx.add([StoredImage("img-3", want.vector, None, None, {"v": "2"})])
    assert idx.get("img-3").metadata == {"v": "2"} and idx.get("img-3").regional is None
    s = idx.stats()
    assert s["images"] == 5 and s["regional_vectors"] == 8 and s["local_features"] == 28
    assert idx.delete(["img-1", "nope"]) == (["img-1"], ["nope"])
    assert idx.get("img-1") is None and len(idx) == 4
    assert idx.stats()["regional_vectors"] == 6
    hits = idx.search(record(0).vector, 10)
    assert hits.ids[0] == "img-0" and "img-1" not in hits.ids and len(hits.ids) == 4
    idx.close()


def test_restart_loads_snapshot_and_replays_only_later_changes(tmp_path):
    idx = open_index(tmp_path, snapshot_every=10_000)
    idx.add([record(i) for i in range(50)])
    seq = idx.snapshot()
    idx.add([record(i) for i in range(50, 60)])
    idx.delete(["img-3", "img-55"])
    idx.add([StoredImage("img-7", record(999).vector, None, None, {"replaced": "yes"})])
    idx.store.close()  # a crash: no final snapshot
    again = open_index(tmp_path)
    assert again.startup.source == "snapshot" and again.startup.replayed == 10 + 2 + 2  # 10 adds, 2 deletes, 1 replace (delete + add)
    assert again.snapshot_sequence == seq
    live = {f"img-{i}": record(i).vector for i in range(60) if i not in (3, 55)}
    live["img-7"] = record(999).vector
    for q in (record(1).vector, record(999).vector, record(57).vector):
        assert again.search(q, 5).ids == exact_top(live, q, 5)
    assert again.get("img-7").metadata == {"replaced": "yes"}
    again.close()  # clean shutdown snapshots: the next start replays nothing
    third = open_index(tmp_path)
    assert third.startup.source == "snapshot" and third.startup.replayed == 0 and len(third) == 58
    third.close()


def test_corrupt_snapshot_rebuilds_from_the_store_and_says_so(tmp_path, caplog):
    idx = open_index(tmp_path)
    idx.add([record(i) for i in range(20)])
    idx.close()
    path = tmp_path / SNAPSHOT_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        again = open_index(tmp_path)
    assert again.startup.source == "rebuilt" and "checksum" in again.startup.reason
    assert "rebuilding the index from the store" in caplog.text
    assert again.search(record(4).vector, 1).ids == ["img-4"]
    again.close()


def test_corrupt_record_and_corrupt_file_are_data_loss(tmp_path):
    idx = open_index(tmp_path / "a")
    idx.add([record(1)])
    store = idx.store
    with store.env.begin(write=True) as txn:  # a bit flip inside a stored vector
        key = (0).to_bytes(8, "big")
        raw = bytearray(txn.get(key, db=store.dbs["vec"]))
        raw[5] ^= 0x01
        txn.put(key, bytes(raw), db=store.dbs["vec"])
    with pytest.raises(StoreCorrupt, match="checksum"):
        store.get("img-1")
    store.close()  # a crash: no snapshot, so the next start rebuilds from every stored vector
    with pytest.raises(StoreCorrupt, match="checksum"):
        open_index(tmp_path / "a")
    os.makedirs(tmp_path / "b")
    (tmp_path / "b" / "data.mdb").write_bytes(b"\x00garbage" * 2048)
    with pytest.raises(StoreCorrupt, match="cannot open"):
        ShardStore(str(tmp_path / "b"))


def test_deletes_give_space_back(tmp_path):
    store = ShardStore(str(tmp_path))
    big = [record(i, regions=5, dim=1024) for i in range(400)]
    store.put(big)
    full = store.size_bytes()
    for _ in range(6):  # churn: freed pages are reused, the file stays near its high-water mark
        store.delete([r.image_id for r in big])
        store.put(big)
    assert store.size_bytes() <= 2.2 * full
    store.delete([r.image_id for r in big[50:]])
    store.close()
    again = ShardStore(str(tmp_path))  # mostly free (a store of a few MB: any size is compacted): compacted at open
    assert again.compacted and again.size_bytes() < full / 3
    assert again.get("img-49") is not None and again.counters()["images"] == 50
    again.close()


def test_approximate_index_trains_and_keeps_deletes_and_replaces(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((40, D)).astype(np.float32)
    recs = []
    for i in range(3000):
        v = centers[i % 40] + 0.3 * rng.standard_normal(D).astype(np.float32)
        recs.append(StoredImage(f"v{i}", v / np.linalg.norm(v), None, None, {}))
    idx = open_index(tmp_path, factory="IVF64,PQ8np", approx_min_images=2000, train_sample=2000, shortlist=200, nprobe=16)
    idx.add(recs[:1500])
    assert idx.factory == "Flat"
    idx.add(recs[1500:])  # crosses the threshold: trained inline (background=False)
    assert idx.factory == "IVF64,PQ8np"
    idx.delete(["v0", "v1"])
    live = {r.image_id: r.vector for r in recs[2:]}
    recall = []
    for j in range(20):
        q = recs[j * 37].vector
        got = idx.search(q, 10).ids
        recall.append(len(set(got) & set(exact_top(live, q, 10))) / 10)
        assert "v0" not in got and "v1" not in got
    assert np.mean(recall) >= 0.9
    idx.close()
    again = open_index(tmp_path, factory="IVF64,PQ8np", approx_min_images=2000)
    assert again.startup.source == "snapshot" and again.factory == "IVF64,PQ8np" and len(again) == 2998
    assert again.search(recs[5].vector, 1).ids == ["v5"]
    again.close()


def test_whitening_change_invalidates_the_snapshot(tmp_path):
    from services.space.whitening import PCAWhitening

    idx = open_index(tmp_path)
    idx.add([record(i) for i in range(100)])
    idx.close()
    idx = open_index(tmp_path)
    w = PCAWhitening().fit(np.stack([record(i).vector for i in range(100)]), dim=16)
    idx.set_whitening(w)
    idx.store.close()  # crash before any snapshot with the new whitening
    again = open_index(tmp_path)
    assert again.startup.source == "rebuilt" and "whitening" in again.startup.reason and again.indexed_dim == 16
    assert again.search(record(9).vector, 1).ids == ["img-9"]
    again.close()


def test_ivfpq_factory_sizes_lists_and_codes():
    assert ivfpq_factory(1_000_000, 1280) == "IVF4096,PQ64np"
    assert ivfpq_factory(100_000, 1280) == "IVF1024,PQ64np"
    assert ivfpq_factory(10, 96) == "IVF256,PQ48np"


def test_auto_index_is_retrained_when_the_shard_outgrows_it(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4200, 16)).astype(np.float32)
    recs = [StoredImage(f"r{i}", v / np.linalg.norm(v), None, None, {}) for i, v in enumerate(x)]
    idx = open_index(tmp_path, approx_min_images=1000, train_sample=1000, retrain_growth=4.0)
    idx.add(recs[:1000])
    first = idx.factory
    assert first.startswith("IVF") and idx._faiss.trained_for == 1000
    idx.add(recs[1000:3900])
    assert idx._faiss.trained_for == 1000  # 3.9x: not yet
    idx.add(recs[3900:])
    assert idx._faiss.trained_for == 4200 and idx._faiss.ntotal == 4200
    assert idx.search(recs[4100].vector, 1).ids == ["r4100"]
    idx.close()
    again = open_index(tmp_path, approx_min_images=1000)
    assert again._faiss.trained_for == 4200 and again.factory == idx.factory
    again.close()
