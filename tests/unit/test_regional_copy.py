"""The broker's regional copy (``services.broker.regional_copy``): written from a graph build's
pages, memory-mapped from the broker's directory, forgetting images written since the build —
also across a restart and for writes that land while the build pages."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from services.broker import graph_build
from services.broker.collection_model import CollectionModel
from services.broker.regional_copy import INDEX_FILE, VECTORS_PREFIX, RegionalCopy, RegionalCopyWriter
from services.rerank.graph import CollectionGraph
from test_graph_streaming import FakeShard, clustered



def held(copy: RegionalCopy, ids: list[str]) -> dict[str, np.ndarray]:
    """What the copy holds of ``ids``, by id (from one ``gather``)."""
    positions, counts, block = copy.gather(ids)
    return {ids[p]: part for p, part in zip(positions.tolist(), np.split(block, np.cumsum(counts)[:-1]))}

def _pages(rng: np.random.Generator, dim: int = 8):
    """Two pages: ids, regional counts (0..3, one image without regions), vectors."""
    out = []
    for p in range(2):
        ids = [f"p{p}-{i}" for i in range(5)]
        counts = [int(c) for c in rng.integers(1, 4, size=5)]
        counts[2] = 0
        out.append((ids, counts, rng.normal(size=(sum(counts), dim)).astype(np.float32)))
    return out


@pytest.mark.parametrize("on_disk", [True, False])
def test_copy_serves_each_image_s_float16_vectors(tmp_path, on_disk):
    pages = _pages(np.random.default_rng(0))
    writer = RegionalCopyWriter(str(tmp_path) if on_disk else "")
    for ids, counts, vecs in pages:
        writer.add(ids, counts, vecs)
    copy = writer.finish()
    if on_disk:
        assert isinstance(copy.vectors, np.memmap)
        assert [n for n in os.listdir(tmp_path) if n.startswith(VECTORS_PREFIX)] and (tmp_path / INDEX_FILE).exists()
    every = [i for ids, _, _ in pages for i in ids]
    got = held(copy, every + ["unknown"])
    assert list(got) == every  # in the order asked, unknown ids absent
    for ids, counts, vecs in pages:
        at = 0
        for image_id, c in zip(ids, counts):
            expected = vecs[at : at + c].astype(np.float16).astype(np.float32)  # what GetFeatures sends
            np.testing.assert_array_equal(got[image_id], expected)
            assert got[image_id].dtype == np.float32
            at += c
    copy.forget(["p0-1"])
    assert "p0-1" not in held(copy, every) and len(copy) == len(every) - 1


def test_a_new_build_replaces_the_old_files_and_a_failed_one_leaves_them(tmp_path):
    rng = np.random.default_rng(1)
    for _ in range(2):
        writer = RegionalCopyWriter(str(tmp_path))
        for ids, counts, vecs in _pages(rng):
            writer.add(ids, counts, vecs)
        writer.finish()
    assert len([n for n in os.listdir(tmp_path) if n.startswith(VECTORS_PREFIX)]) == 1
    before = held(RegionalCopy.load(str(tmp_path)), ["p1-0"])["p1-0"]
    failed = RegionalCopyWriter(str(tmp_path))
    failed.add(["p1-0"], [1], rng.normal(size=(1, 8)).astype(np.float32))
    failed.abort()
    assert len([n for n in os.listdir(tmp_path) if n.startswith(VECTORS_PREFIX)]) == 1
    np.testing.assert_array_equal(held(RegionalCopy.load(str(tmp_path)), ["p1-0"])["p1-0"], before)


def test_a_copy_of_another_format_is_not_read(tmp_path):
    import io

    writer = RegionalCopyWriter(str(tmp_path))
    writer.add(["a"], [1], np.ones((1, 4), np.float32))
    writer.finish()
    with np.load(tmp_path / INDEX_FILE) as z:
        fields = {k: z[k] for k in z.files if k != "dtype"}
    buf = io.BytesIO()
    np.savez(buf, **fields)  # as an earlier (float16) copy wrote it: no dtype
    (tmp_path / INDEX_FILE).write_bytes(buf.getvalue())
    assert RegionalCopy.load(str(tmp_path)) is None


def test_writer_refuses_inconsistent_pages():
    writer = RegionalCopyWriter()
    with pytest.raises(ValueError, match="counts sum"):
        writer.add(["a"], [2], np.zeros((1, 4), np.float32))
    writer.add(["a"], [1], np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="dimension"):
        writer.add(["b"], [1], np.zeros((1, 5), np.float32))


def test_graph_build_fills_the_copy_from_its_pages():
    x = clustered(600, seed=3)
    shards = [FakeShard(i, [f"s{i}-{j}" for j in range(300)], x[i * 300 : (i + 1) * 300], x[i * 300 : (i + 1) * 300]) for i in range(2)]

    async def run(fn, *args):
        return fn(*args)

    writer = RegionalCopyWriter()
    asyncio.run(graph_build.build_graphs(shards, lambda v: v, k=8, regional_k=8, page=128, timeout=lambda: 10.0, run=run, copy=writer))
    copy = writer.finish()
    assert len(copy) == 600
    got = held(copy, ["s1-7", "s0-299"])
    np.testing.assert_array_equal(got["s1-7"], x[307:308].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(got["s0-299"], x[299:300].astype(np.float16).astype(np.float32))


def _graphs(ids: list[str]) -> tuple[CollectionGraph, CollectionGraph]:
    x = clustered(len(ids), seed=4)
    return CollectionGraph.build(ids, x, 3), CollectionGraph.build([f"{i}#0" for i in ids], x, 3)


def test_collection_forgets_writes_in_the_copy_also_during_a_build_and_after_a_restart(tmp_path):
    ids = [f"img{i}" for i in range(10)]
    model = CollectionModel(str(tmp_path))
    writer = model.begin_build()
    writer.add(ids, [1] * 10, clustered(10, seed=5))
    model.graph_forget(["img3"])  # written while the build pages: its paged vectors may be old
    graph, regional = _graphs(ids)
    model.set_graph(graph, regional, writer.finish())
    assert "img3" not in held(model.regional_copy, ids) and len(model.regional_copy) == 9
    model.graph_forget(["img4"])  # written after the build
    assert set(held(model.regional_copy, ids)) == set(ids) - {"img3", "img4"}

    restarted = CollectionModel(str(tmp_path))
    assert isinstance(restarted.regional_copy.vectors, np.memmap)
    assert set(held(restarted.regional_copy, ids)) == set(ids) - {"img3", "img4"}
    np.testing.assert_array_equal(held(restarted.regional_copy, ["img0"])["img0"], held(model.regional_copy, ["img0"])["img0"])

    restarted.set_graph(None)  # graphs removed (e.g. a new whitening): the copy goes with them
    assert restarted.regional_copy is None and CollectionModel(str(tmp_path)).regional_copy is None
    assert not [n for n in os.listdir(tmp_path) if n.startswith(VECTORS_PREFIX)]
