"""Versions, tombstones and digests of a shard store (real LMDB and faiss in a temp directory):
what lets replicas that saw the same writes in any order, or copied each other, agree."""

from __future__ import annotations

import itertools

import numpy as np

from services.index.shard_index import ShardIndex
from services.index.store import ShardStore, StoredImage
from services.index.vector_index import IndexSettings

D = 16


def rec(name: str, seed: int, md: str = "") -> StoredImage:
    v = np.random.default_rng(seed).standard_normal(D).astype(np.float32)
    return StoredImage(name, v / np.linalg.norm(v), None, None, {"md": md})


def open_index(path) -> ShardIndex:
    return ShardIndex(ShardStore(str(path)), IndexSettings(), background=False)


WRITES = [  # (kind, id, version, seed)
    ("add", "a", 10, 1), ("add", "b", 11, 2), ("add", "a", 12, 3), ("delete", "b", 13, 0),
    ("add", "c", 14, 4), ("delete", "never", 15, 0), ("add", "b", 9, 5),  # an add older than b's delete
]


def apply(idx: ShardIndex, write: tuple[str, str, int, int]) -> None:
    kind, image_id, version, seed = write
    if kind == "add":
        idx.add([rec(image_id, seed)], [version])
    else:
        idx.delete([image_id], [version])


def state(idx: ShardIndex) -> tuple[int, list]:
    entries, done = idx.store.versions_after("", 100)
    assert done
    return idx.stats()["digest"], [(e.image_id, e.version, e.deleted) for e in entries]


def test_replicas_that_apply_the_same_writes_in_any_order_agree(tmp_path):
    reference = None
    for n, order in enumerate(itertools.islice(itertools.permutations(WRITES), 0, 5040, 997)):
        idx = open_index(tmp_path / f"r{n}")
        for w in order:
            apply(idx, w)
        got = (state(idx), sorted(h for h in idx.search(np.ones(D, np.float32), 10).ids))
        reference = reference or got
        assert got == reference, order
        idx.close()
    (digest, entries), live = reference
    assert entries == [("a", 12, False), ("b", 13, True), ("c", 14, False), ("never", 15, True)]
    assert live == ["a", "c"]  # the delete of b beat the older add; "a" holds its newest record


def test_an_older_write_never_replaces_a_newer_one(tmp_path):
    idx = open_index(tmp_path)
    idx.add([rec("x", 1, "new")], [20])
    assert idx.add([rec("x", 2, "old")], [19]) == 1  # acknowledged (the replica holds newer) …
    assert idx.get("x").metadata == {"md": "new"}  # … and skipped
    deleted, missing = idx.delete(["x"], [18])
    assert deleted == [] and missing == ["x"] and idx.get("x") is not None  # a stale delete changes nothing
    assert idx.stats()["max_version"] == 20 and idx.stats()["tombstones"] == 0


def test_digest_follows_contents_and_survives_a_restart(tmp_path):
    idx = open_index(tmp_path / "a")
    assert idx.stats()["digest"] == 0
    idx.add([rec("x", 1)], [5])
    one = idx.stats()["digest"]
    idx.add([rec("y", 2)], [6])
    idx.delete(["y"], [7])
    assert idx.stats()["digest"] not in (0, one)  # the tombstone of y counts
    other = open_index(tmp_path / "b")
    other.delete(["y"], [7])
    other.add([rec("x", 1)], [5])
    assert other.stats()["digest"] == idx.stats()["digest"]
    store_id = idx.store.store_id
    idx.close()
    again = open_index(tmp_path / "a")
    assert again.stats()["digest"] == other.stats()["digest"] and again.store.store_id == store_id
    assert store_id != other.store.store_id and len(store_id) == 32


def test_unversioned_writes_get_the_stores_next_version(tmp_path):
    idx = open_index(tmp_path)
    idx.add([rec("x", 1)])
    idx.add([rec("x", 2)])
    idx.delete(["x"])
    (entry,) = idx.store.versions_of(["x"])
    assert entry is not None and entry.deleted and entry.version == 3


def test_versions_page_in_id_order_up_to_a_bound(tmp_path):
    idx = open_index(tmp_path)
    idx.add([rec(f"id{i:02d}", i) for i in range(10)], [100 + i for i in range(10)])
    page, done = idx.store.versions_after("", 4)
    assert [e.image_id for e in page] == ["id00", "id01", "id02", "id03"] and not done
    page, done = idx.store.versions_after("id03", 100, upto="id06")
    assert [e.image_id for e in page] == ["id04", "id05", "id06"] and done
    assert idx.store.versions_of(["id05", "nope"])[0].version == 105 and idx.store.versions_of(["nope"]) == [None]
