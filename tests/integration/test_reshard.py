"""Live resharding on real parts (issue 25): a local Ray cluster, the broker's Reshard rpc (through
``loupe reshard`` and the Python client), real shard stores and extractors.

A 2-shard cluster gets 1500 records with random global vectors (metadata ``set=base``) through the
API (a Restore of a backup written with the backup modules: no extraction), then is resharded
2 → 3 → 2 while one thread searches (20 queries restricted to ``set=base``, whose answers must
not change) and lists the collection, and another adds real images and deletes some of them.
Every answer during the moves must be complete (not partial, the same ids and scores as before),
without a duplicate; afterwards every acknowledged add is there, no acknowledged delete is, and the
layout files say 2 shards of the bucket placement, the retired shard's metrics are gone, and a
restart over the same directories (with the marker a reshard stopped midway leaves) serves the same.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cluster.config import ClusterConfig
from cluster.demo import INDEXED, PHOTOS, encode_jpeg, load_photo
from cluster.launcher import Cluster
from loupe.client import ImageToAdd, RetrievalClient
from loupe.v1 import shard_pb2
from shard_records import shard_record, unit_vector
from services.backup.storage import DirectoryStorage
from services.backup.take import take_backup
from services.broker.resharding import MARKER
from services.space.layout import Layout, read_layout
from services.space.placement import PLACEMENT_VERSION

pytestmark = pytest.mark.usefixtures("local_ray")  # one Ray for the whole run (tests/conftest.py)
CLUSTER = {"replicas": 1, "max_side": 128, "global_max_side": 128, "scales": (1.0,), "startup_timeout_s": 180}
BASE = 1500
BASE_FILTER = ["set=base"]
LOUPE = str(Path(sys.executable).parent / "loupe")


class _Seed:
    """The records of one source shard for ``take_backup``: random unit vectors, one version."""

    def __init__(self, dim: int, n: int) -> None:
        rng = np.random.default_rng(25)
        self.shard_id = 0
        self.records: dict[str, shard_pb2.ShardRecord] = {}
        for i in range(n):
            self.records[f"base/{i:05d}"] = shard_record(f"base/{i:05d}", unit_vector(rng, dim), metadata={"set": "base"}, version=1)

    async def stats(self, timeout_s: float) -> shard_pb2.ShardStatsResponse:
        return shard_pb2.ShardStatsResponse(shard_id=0, images=len(self.records), store_id="seed")

    async def list_versions(self, req: shard_pb2.ListVersionsRequest, timeout_s: float) -> shard_pb2.ListVersionsResponse:
        ids = sorted(i for i in self.records if i > req.after)
        page = ids[:req.limit]
        return shard_pb2.ListVersionsResponse(ids=page, versions=[1] * len(page), deleted=[False] * len(page), done=len(ids) <= req.limit)

    async def get_records(self, req: shard_pb2.GetRecordsRequest, timeout_s: float) -> shard_pb2.GetRecordsResponse:
        return shard_pb2.GetRecordsResponse(records=[self.records[i] for i in req.ids if i in self.records], consumed=len(req.ids))


def _seed_backup(directory: Path, dim: int) -> None:
    async def run(fn, *args):
        return fn(*args)

    asyncio.run(take_backup(DirectoryStorage(str(directory)), [_Seed(dim, BASE)], {}, started_version=2,
                            layout={"shards": 1, "placement": PLACEMENT_VERSION}, model={}, run=run))


def _extractor_dim(cluster: Cluster) -> int:
    """The extractors' global descriptor dimension (the broker asks them; the seed records must match)."""
    servicer = cluster._broker.servicer  # type: ignore[union-attr]
    return asyncio.run_coroutine_threadsafe(servicer.extractors.describe(60.0), cluster._loop).result(90).dim  # type: ignore[arg-type]


def _answers(client: RetrievalClient, queries: list[str]) -> dict[str, list[tuple[str, float]]]:
    out = {}
    for q in queries:
        resp = client.search(image_id=q, k=10, filter=BASE_FILTER, timeout_s=30)
        assert not resp.partial, resp.missing_shards
        out[q] = [(r.id, r.score) for r in resp.results]
    return out


def _same(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> bool:
    return [i for i, _ in a] == [i for i, _ in b] and all(abs(x - y) <= 1e-5 for (_, x), (_, y) in zip(a, b))


def test_reshard_2_3_2_under_search_and_write_load(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = ClusterConfig(shards=2, data_dir=str(data), **CLUSTER)
    with Cluster(cfg) as cluster, RetrievalClient(cluster.broker_address, retries=False) as client:
        client.wait_ready(60)
        _seed_backup(tmp_path / "seed", _extractor_dim(cluster))
        assert client.restore(str(tmp_path / "seed")).images == BASE
        queries = [f"base/{i:05d}" for i in range(0, BASE, BASE // 20)][:20]
        before = _answers(client, queries)
        images = [encode_jpeg(fn(load_photo(p))) for p in PHOTOS[:4] for fn in INDEXED.values()]

        stop = threading.Event()
        problems: list[str] = []
        counts = {"searches": 0, "listings": 0}
        acked: set[str] = set()
        deleted: set[str] = set()

        def search_load() -> None:
            with RetrievalClient(cluster.broker_address, retries=False) as c:
                while not stop.is_set():
                    try:
                        for q in queries:
                            resp = c.search(image_id=q, k=10, filter=BASE_FILTER, timeout_s=30)
                            got = [(r.id, r.score) for r in resp.results]
                            if resp.partial or not _same(got, before[q]):
                                problems.append(f"search {q}: partial={resp.partial} {got[:3]} != {before[q][:3]}")
                            counts["searches"] += 1
                        ids = [img.id for img in c.iter_images(page_size=400)]
                        base = [i for i in ids if i.startswith("base/")]
                        if len(ids) != len(set(ids)) or len(base) != BASE:
                            problems.append(f"listing: {len(ids)} ids, {len(set(ids))} distinct, {len(base)} base")
                        counts["listings"] += 1
                    except Exception as exc:  # a failed call is a failure of the test, not of this thread
                        problems.append(f"search load: {type(exc).__name__}: {exc}")

        def write_load() -> None:
            n = 0
            with RetrievalClient(cluster.broker_address, retries=False) as c:
                while not stop.is_set():
                    image_id = f"load/{n:04d}"
                    c.add_images([ImageToAdd(image_id, images[n % len(images)], {"set": "load"})], timeout_s=60)
                    acked.add(image_id)
                    if n % 3 == 2:  # delete an earlier one
                        victim = f"load/{n - 2:04d}"
                        c.delete([victim])
                        deleted.add(victim)
                    n += 1

        threads = [threading.Thread(target=search_load), threading.Thread(target=write_load)]
        for t in threads:
            t.start()
        try:
            while counts["searches"] < 20:  # the load runs before the first move starts
                stop.wait(0.05)
            at_start = counts["searches"]
            up = subprocess.run([LOUPE, "reshard", "--address", cluster.broker_address, "--shards", "3", "--json"],
                                capture_output=True, text=True, timeout=300)
            assert up.returncode == 0, up.stderr[-3000:]
            grown = json.loads(up.stdout)
            assert (grown["from_shards"], grown["to_shards"], grown["to_placement"]) == (2, 3, PLACEMENT_VERSION)
            assert 0.2 * BASE < grown["records_moved"] < 0.5 * BASE and grown["copies_removed"] > 0.2 * BASE
            assert read_layout(data).shards == 3 and read_layout(data / "shard-002").shards == 3
            down = client.reshard(2)
            assert (down.from_shards, down.to_shards) == (3, 2) and down.records_moved > 0.2 * BASE
            during = counts["searches"] - at_start
        finally:
            stop.set()
            for t in threads:
                t.join(120)
        print(f"reshard 2→3: {grown['records_moved']} moved in {grown['seconds']:.1f} s; 3→2: {down.records_moved} moved in "
              f"{down.seconds:.1f} s; {during} searches while moving, {counts['listings']} listings in all, "
              f"{len(acked)} adds and {len(deleted)} deletes acknowledged")
        assert not problems, problems[:5]
        assert during >= 20 and counts["listings"] >= 2 and acked and deleted
        ids = [img.id for img in client.iter_images(page_size=1000)]
        assert len(ids) == len(set(ids))
        assert acked - deleted <= set(ids) and not deleted & set(ids)  # no acknowledged write lost
        after = _answers(client, queries)
        assert all(_same(after[q], before[q]) for q in queries)
        assert read_layout(data) == Layout(shards=2, placement=PLACEMENT_VERSION)
        stats = client.stats()
        assert [s.shard_id for s in stats.shards] == [0, 1] and stats.images == len(ids)
        exported = urllib.request.urlopen(f"http://{cluster.metrics_address}/metrics", timeout=10).read().decode()
        assert 'loupe_shard_up{shard="1"}' in exported and 'shard="2"' not in exported  # the retired shard's series are gone

    # a broker stopped midway leaves its marker: the next start removes what that reshard left (nothing
    # here) before it serves, with the layout the files record
    (data / MARKER).write_text(json.dumps({"from": 2, "to": 3}))
    with Cluster(cfg) as cluster, RetrievalClient(cluster.broker_address, retries=False) as client:
        client.wait_ready(60)
        assert not (data / MARKER).exists()
        assert sorted(img.id for img in client.iter_images(page_size=1000)) == sorted(ids)
        again = _answers(client, queries)
        assert all(_same(again[q], before[q]) for q in queries)
