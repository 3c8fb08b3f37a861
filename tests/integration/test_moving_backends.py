"""Backends that move or hang while the cluster serves (issue 22, part 1), on real parts.

Two extractor replicas on a local Ray: one stopped with SIGSTOP (hung: its TCP connections stay
open and nothing answers) must cost latency, not errors; a replica killed with SIGKILL is
restarted by Ray on a *new port* and must be reached there again (the broker looks the address up
in the registry instead of dialling the start-up address forever).
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
import ray

from cluster.config import ClusterConfig
from cluster.demo import HELD_OUT, INDEXED, PHOTOS, encode_jpeg, load_photo
from cluster.launcher import Cluster
from loupe.client import ImageToAdd, RetrievalClient
from services.broker.config import BrokerConfig

PHOTO_SUBSET = PHOTOS[:3]
DEADLINE_S = 8.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cfg = ClusterConfig(shards=1, replicas=2, max_side=256, global_max_side=256, scales=(1.0,),
                        data_dir=str(tmp_path_factory.mktemp("moving")))
    # quick health rounds so a hung replica is noticed within a second or two; hedge after 1 s
    with Cluster(cfg, BrokerConfig(shard_health_period_s=0.5, shard_health_timeout_s=0.5, extract_hedge_s=1.0)) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    with RetrievalClient(cluster.broker_address, retries=False) as c:  # no client retries: the broker must cope
        c.wait_ready(60)
        db = [ImageToAdd(f"{p}/{t}", encode_jpeg(fn(load_photo(p))), {}) for p in PHOTO_SUBSET for t, fn in INDEXED.items()]
        assert c.add_images(db, batch_size=4).added == len(db)
        yield c


def _pid(actor) -> int:
    return ray.get(actor.pid.remote(), timeout=30)


def _searches_and_adds(client: RetrievalClient, rounds: int, tag: str) -> list[float]:
    """Image searches and adds, each with DEADLINE_S; returns their latencies (any error fails)."""
    took = []
    for i in range(rounds):
        photo = PHOTO_SUBSET[i % len(PHOTO_SUBSET)]
        t0 = time.monotonic()
        resp = client.search(image=encode_jpeg(HELD_OUT["perspective"](load_photo(photo))), k=3, timeout_s=DEADLINE_S)
        took.append(time.monotonic() - t0)
        assert resp.results[0].id.startswith(photo + "/") and not resp.partial
        t0 = time.monotonic()
        added = client.add_images([ImageToAdd(f"{photo}/{tag}-{i}", encode_jpeg(load_photo(photo)), {})], timeout_s=DEADLINE_S)
        took.append(time.monotonic() - t0)
        assert added.added == 1
    return took


def test_a_hung_extractor_replica_costs_latency_not_errors(cluster, client):
    victim = _pid(cluster.extractor_actors[1])
    os.kill(victim, signal.SIGSTOP)
    try:
        took = _searches_and_adds(client, 6, "hung")
    finally:
        os.kill(victim, signal.SIGCONT)
    assert max(took) < DEADLINE_S
    print(f"one of 2 replicas hung: {len(took)} calls, slowest {max(took):.2f} s, median {sorted(took)[len(took) // 2]:.2f} s")


def test_a_killed_extractor_replica_is_reached_at_its_new_address(cluster, client):
    """Replica 0 is killed; replica 1 is then hung, so only the restarted replica 0 (new port) can
    serve: searches must succeed again within 20 s of the kill."""
    before = client.stats().extractors[0]
    os.kill(_pid(cluster.extractor_actors[0]), signal.SIGKILL)
    t_kill = time.monotonic()
    other = _pid(cluster.extractor_actors[1])
    os.kill(other, signal.SIGSTOP)
    recovered = None
    try:
        while time.monotonic() - t_kill < 90:
            try:
                resp = client.search(image=encode_jpeg(HELD_OUT["perspective"](load_photo("coffee"))), k=3, timeout_s=DEADLINE_S)
            except grpc.RpcError as exc:
                assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), exc
                time.sleep(0.5)
                continue
            assert resp.results[0].id.startswith("coffee/")
            recovered = time.monotonic() - t_kill
            break
    finally:
        os.kill(other, signal.SIGCONT)
    after = client.stats().extractors[0]
    print(f"extractor replica 0 killed: {before} -> {after}, image searches answer again after {recovered} s")
    assert recovered is not None, "image searches never answered again after the replica's restart"
    assert after != before, "the restarted replica should listen on a new port"
    assert recovered <= 20.0, f"searches answered again only after {recovered:.1f} s"
