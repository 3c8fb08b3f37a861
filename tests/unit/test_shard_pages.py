"""A shard pages through its vectors (for the collection graph) with a cursor that survives writes."""

from __future__ import annotations

import numpy as np

from services.index.shard_index import ShardIndex
from services.index.store import ShardStore, StoredImage


def _rec(image_id: str, seed: int, regions: int = 0) -> StoredImage:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(16).astype(np.float32)
    r = rng.standard_normal((regions, 16)).astype(np.float16) if regions else None
    return StoredImage(image_id, v / np.linalg.norm(v), r, None)


def _all_pages(index: ShardIndex, limit: int, writes=None) -> tuple[list[str], int]:
    ids, cursor, regional_rows = [], 0, 0
    while True:
        page = index.list_vectors(cursor, limit, regional=True)
        ids += page.ids
        assert page.vectors.shape == (len(page.ids), 16)
        np.testing.assert_allclose(np.linalg.norm(page.vectors, axis=1), 1.0, atol=1e-5)
        assert len(page.regional) == sum(page.regional_counts)
        regional_rows += len(page.regional)
        if writes is not None:
            writes()
            writes = None
        if page.done:
            return ids, regional_rows
        cursor = page.next_cursor


def test_pages_cover_every_image_once_with_their_regions(tmp_path) -> None:
    index = ShardIndex(ShardStore(str(tmp_path)))
    index.add([_rec(f"a{i}", i, regions=i % 3) for i in range(10)])
    ids, rows = _all_pages(index, limit=3)
    assert ids == [f"a{i}" for i in range(10)]
    assert rows == sum(i % 3 for i in range(10))
    empty = ShardIndex(ShardStore(str(tmp_path / 'empty'))).list_vectors(0, 5)
    assert empty.done and empty.ids == []


def test_cursor_survives_writes_between_pages(tmp_path) -> None:
    index = ShardIndex(ShardStore(str(tmp_path)))
    index.add([_rec(f"a{i}", i) for i in range(6)])

    def writes() -> None:  # after the first page: delete a later image, replace an earlier one, add one
        index.delete(["a4"])
        index.add([_rec("a0", 99), _rec("new", 100)])

    ids, _ = _all_pages(index, limit=2, writes=writes)
    assert ids == ["a0", "a1", "a2", "a3", "a5", "a0", "new"]  # a replaced image comes again, as its new version
