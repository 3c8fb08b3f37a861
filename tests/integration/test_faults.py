"""Fault tolerance on a real cluster: a hung (SIGSTOPped) shard, and overload.

The numbers printed here (run with ``-s``) are the ones reported in docs/faults.md; the
assertions are on outcomes only (partial answers naming the stopped shard, fast refusals
carrying a retry hint), never on timings.
"""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import signal
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import ray

from cluster.config import ClusterConfig
from cluster.demo import encode_jpeg, load_photo
from cluster.launcher import Cluster
from loupe.client import ImageToAdd, RetrievalClient, search_request
from loupe.rerank_spec import DEFAULT_SEARCH_RERANK, parse_rerank
from loupe.tensors import from_tensor
from loupe.v1 import extractor_pb2, extractor_pb2_grpc, retrieval_pb2_grpc
from services.broker.config import BrokerConfig

pytestmark = pytest.mark.usefixtures("local_ray")  # one Ray for the whole run (tests/conftest.py)

PHOTOS = ("coffee", "chelsea", "rocket", "camera", "astronaut", "coins")
EXTRACT_QUEUE = 8
INTERNAL_TOKEN = secrets.token_urlsafe(32)


def _jpeg(name: str, side: int = 160) -> bytes:
    img = load_photo(name)
    step = max(1, max(img.shape[:2]) // side)
    return encode_jpeg(np.ascontiguousarray(img[::step, ::step]))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # the internal token is always on: this test reads it from its own file to call an extractor directly
    (token_file := tmp_path_factory.mktemp("internal") / "token").write_text(INTERNAL_TOKEN)
    cfg = ClusterConfig(shards=2, replicas=1, max_side=160, global_max_side=160, scales=(1.0,), data_dir=str(tmp_path_factory.mktemp("faults")),
                        internal_token_file=str(token_file))
    with Cluster(cfg, BrokerConfig(max_extract_queue=EXTRACT_QUEUE)) as c:
        with RetrievalClient(c.broker_address) as client:
            client.wait_ready(30)
            client.add_images([ImageToAdd(f"{p}/{i}", _jpeg(p, 160 - 16 * i)) for p in PHOTOS for i in range(3)])
        yield c


@pytest.fixture(scope="module")
def vector(cluster):
    address = ray.get(cluster.extractor_actors[0].address.remote())
    with grpc.insecure_channel(address) as ch:
        feats = extractor_pb2_grpc.ExtractorStub(ch).Extract(extractor_pb2.ExtractRequest(image=_jpeg("coffee")), timeout=60,
                                                             metadata=(("authorization", f"Bearer {INTERNAL_TOKEN}"),)).features
    return from_tensor(getattr(feats, "global"))


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def test_a_stopped_shard_costs_a_partial_answer_not_the_deadline(cluster, vector):
    pid = ray.get(cluster.shard_actors[1].pid.remote())
    with RetrievalClient(cluster.broker_address, retries=False) as client:
        assert not client.search(vector=vector, k=5, timeout_s=10).partial
        os.kill(pid, signal.SIGSTOP)
        try:
            lat, partial, missing = [], 0, set()
            for _ in range(12):
                t0 = time.perf_counter()
                resp = client.search(vector=vector, k=5, timeout_s=2.0)  # DEADLINE_EXCEEDED here would fail the test
                lat.append(time.perf_counter() - t0)
                partial += resp.partial
                missing |= set(resp.missing_shards)
                assert resp.results and all(r.shard_id == 0 for r in resp.results)
            img_lat = []
            for _ in range(5):
                t0 = time.perf_counter()
                resp = client.search(image=_jpeg("chelsea"), k=5, timeout_s=10.0)
                img_lat.append(time.perf_counter() - t0)
                assert resp.partial and list(resp.missing_shards) == [1]
        finally:
            os.kill(pid, signal.SIGCONT)
        print(f"\nstopped shard: vector queries (2 s deadline) p50 {_pct(lat, 50):.2f} s p99 {_pct(lat, 99):.2f} s, "
              f"partial {partial}/{len(lat)}; image queries (10 s) p99 {_pct(img_lat, 99):.2f} s")
        assert partial == len(lat) and missing == {1}
        for _ in range(100):  # the shard answers again once continued
            if not client.search(vector=vector, k=5, timeout_s=10).partial:
                break
            time.sleep(0.1)
        else:
            pytest.fail("shard 1 never came back after SIGCONT")


def test_a_search_by_id_on_a_stopped_shard_is_unavailable(cluster):
    """The only copy of the image's shard is hung: UNAVAILABLE naming the shard once its budget
    (2 s) ran out, while the caller's 5 s deadline still runs, not DEADLINE_EXCEEDED."""
    from services.space.placement import Placement

    image_id = next(f"{p}/{i}" for p in PHOTOS for i in range(3) if Placement(2).shard_of(f"{p}/{i}") == 1)
    pid = ray.get(cluster.shard_actors[1].pid.remote())
    with RetrievalClient(cluster.broker_address, retries=False) as client:
        assert client.search(image_id=image_id, k=3, timeout_s=10).results
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.perf_counter()
            with pytest.raises(grpc.RpcError) as err:
                client.search(image_id=image_id, k=3, timeout_s=5.0)
            took = time.perf_counter() - t0
        finally:
            os.kill(pid, signal.SIGCONT)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (err.value.code(), err.value.details())
    assert "shard 1" in err.value.details() and took < 5.0, (err.value.details(), took)


def test_overload_is_refused_fast_with_a_retry_hint(cluster):
    image = _jpeg("rocket")
    admitted_cap = 2 + EXTRACT_QUEUE  # 2 extraction slots per replica + the queue
    n = 4 * admitted_cap

    clients = [RetrievalClient(cluster.broker_address, retries=False) for _ in range(n)]  # connected before the burst
    for c in clients:
        c.wait_ready(30)

    def one(i: int) -> tuple[str, float, str]:
        t0 = time.perf_counter()
        try:
            clients[i].search(image=image, k=3, timeout_s=60)
            return "OK", time.perf_counter() - t0, ""
        except grpc.RpcError as exc:
            return exc.code().name, time.perf_counter() - t0, exc.details() or ""

    with RetrievalClient(cluster.broker_address) as c:
        c.search(image=image, k=3, timeout_s=60)  # warm
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    for c in clients:
        c.close()
    codes = [r[0] for r in results]
    refused = [r for r in results if r[0] == "RESOURCE_EXHAUSTED"]
    admitted = [r[1] for r in results if r[0] == "OK"]
    print(f"\noverload: {n} concurrent image searches, {len(admitted)} OK (p99 {_pct(admitted, 99):.2f} s), "
          f"{len(refused)} RESOURCE_EXHAUSTED (p50 {_pct([r[1] for r in refused], 50) * 1000:.0f} ms, "
          f"p99 {_pct([r[1] for r in refused], 99) * 1000:.0f} ms)")
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert refused and admitted
    assert all("retry after" in r[2] and "max_extract_queue" in r[2] for r in refused), refused[0][2]


def test_searches_are_admitted_while_indexing_fills_its_queue(cluster):
    """Indexing in closed loops keeps more images in flight than the extraction slots plus the
    queue hold, so some of it is refused; searches meanwhile have a queue of their own and take
    freed slots first: every one is answered."""
    image = _jpeg("rocket")
    indexers = 2 + EXTRACT_QUEUE + 6
    stop_at = time.perf_counter() + 4.0
    clients = [RetrievalClient(cluster.broker_address, retries=False) for _ in range(indexers + 1)]
    for c in clients:
        c.wait_ready(30)

    def flood(t: int) -> dict[str, int]:
        codes: dict[str, int] = {}
        n = 0
        while time.perf_counter() < stop_at and n < 200:
            try:
                clients[t].add_images([ImageToAdd(f"flood/{t}/{n}", _jpeg(PHOTOS[n % len(PHOTOS)], 150))], timeout_s=30)
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.RpcError as exc:
                codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
                time.sleep(0.02)
            n += 1
        return codes

    searches = []
    with ThreadPoolExecutor(indexers) as pool:
        futures = [pool.submit(flood, t) for t in range(indexers)]
        time.sleep(0.5)  # the flood is under way
        while time.perf_counter() < stop_at - 0.5:
            t0 = time.perf_counter()
            try:
                clients[-1].search(image=image, k=3, timeout_s=30)
                searches.append(("OK", time.perf_counter() - t0))
            except grpc.RpcError as exc:
                searches.append((exc.code().name, time.perf_counter() - t0))
        index_codes: dict[str, int] = {}
        for f in futures:
            for code, n in f.result().items():
                index_codes[code] = index_codes.get(code, 0) + n
    for c in clients:
        c.close()
    print(f"\nsearch under an indexing flood: {len(searches)} searches {sorted({s[0] for s in searches})}, "
          f"p50 {_pct([s[1] for s in searches], 50) * 1000:.0f} ms; indexing {index_codes}")
    assert index_codes.get("RESOURCE_EXHAUSTED", 0) > 0, index_codes  # the flood did fill indexing's queue
    assert searches and all(code == "OK" for code, _ in searches), searches


def _metric_values(metrics_address: str, names: tuple[str, ...]) -> dict[str, float]:
    """The named samples (``name{labels}`` as exposed) of the broker's /metrics."""
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.rsplit(" ", 1)[0] in names}


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


BURST = 400
IN_USE, WAITING, SEARCHES = 'loupe_admission_in_use{pool="rerank"}', 'loupe_admission_waiting{pool="rerank"}', \
    'loupe_inflight_requests{grpc_method="Search"}'


def test_a_default_rerank_burst_admits_no_more_than_the_rerank_budget(cluster):
    """400 concurrent searches with the default rerank (verify, regional diffusion first, the
    global top-V verified too), half by image, half by stored id (no extraction: only the rerank
    budget holds them back). Sampled from the broker's /metrics: never more than
    ``rerank_slots`` in flight or ``max_rerank_queue`` waiting; every refusal is
    RESOURCE_EXHAUSTED with a pushback trailer; no admitted search times out or fails. Broker
    (this process) and extractor RSS before/after are printed."""
    slots, queue = cluster.broker_config.rerank_slots, cluster.broker_config.max_rerank_queue
    rerank = parse_rerank(DEFAULT_SEARCH_RERANK)
    image = _jpeg("rocket", 128)
    ids = [f"{p}/{i}" for p in PHOTOS for i in range(3)]
    requests = [search_request(image=image, k=5, rerank=rerank) if i % 2 else search_request(image_id=ids[i % len(ids)], k=5, rerank=rerank)
                for i in range(BURST)]
    extractor_pid = ray.get(cluster.extractor_actors[0].pid.remote())
    with RetrievalClient(cluster.broker_address) as c:
        for req in requests[:2]:  # warm both paths
            c.stub.Search(req, timeout=60)
    gc.collect()
    rss_before = (_rss_mib(os.getpid()), _rss_mib(extractor_pid))

    peaks: dict[str, float] = {IN_USE: 0.0, WAITING: 0.0, SEARCHES: 0.0}
    samples = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for name, value in _metric_values(cluster.metrics_address, (IN_USE, WAITING, SEARCHES)).items():
                peaks[name] = max(peaks[name], value)
            samples.append(time.perf_counter())
            time.sleep(0.005)

    async def burst() -> list[tuple[str, float, str, str | None]]:
        channels = [grpc.aio.insecure_channel(cluster.broker_address) for _ in range(4)]
        stubs = [retrieval_pb2_grpc.RetrievalStub(ch) for ch in channels]
        await asyncio.gather(*(ch.channel_ready() for ch in channels))

        async def one(i: int) -> tuple[str, float, str, str | None]:
            t0 = time.perf_counter()
            try:
                await stubs[i % len(stubs)].Search(requests[i], timeout=20)
                return "OK", time.perf_counter() - t0, "", None
            except grpc.aio.AioRpcError as exc:
                pushback = next((v for k, v in (exc.trailing_metadata() or ()) if k == "grpc-retry-pushback-ms"), None)
                return exc.code().name, time.perf_counter() - t0, exc.details() or "", pushback

        try:
            return await asyncio.gather(*(one(i) for i in range(BURST)))
        finally:
            for ch in channels:
                await ch.close()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    results = asyncio.run(burst())
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join(10)
    time.sleep(1.0)
    gc.collect()
    rss_after = (_rss_mib(os.getpid()), _rss_mib(extractor_pid))

    codes = Counter(r[0] for r in results)
    refused = [r for r in results if r[0] == "RESOURCE_EXHAUSTED"]
    admitted = [r[1] for r in results if r[0] != "RESOURCE_EXHAUSTED"]
    print(f"\nrerank burst: {BURST} default-rerank searches in {wall:.1f} s: {dict(codes)}; admitted p99 {_pct(admitted, 99):.2f} s, "
          f"refused p99 {_pct([r[1] for r in refused], 99) * 1000:.0f} ms; peak rerank in flight {peaks[IN_USE]:.0f} "
          f"(slots {slots}), waiting {peaks[WAITING]:.0f} (queue {queue}), Search calls in the broker "
          f"{peaks[SEARCHES]:.0f} ({len(samples)} samples of /metrics); RSS MiB broker {rss_before[0]:.0f} -> {rss_after[0]:.0f}, "
          f"extractor {rss_before[1]:.0f} -> {rss_after[1]:.0f}")
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, [r for r in results if r[0] not in ("OK", "RESOURCE_EXHAUSTED")][:3]
    assert refused and admitted
    assert all(r[3] is not None and int(r[3]) > 0 and "retry after" in r[2] for r in refused), refused[0]
    assert len(samples) >= 10 and peaks[IN_USE] <= slots and peaks[WAITING] <= queue, (len(samples), peaks)


def test_a_batch_of_reranking_queries_runs_under_its_share(cluster):
    """A SearchBatch of default-rerank queries holds part of the rerank budget (at most half)
    and answers every query."""
    rerank = parse_rerank(DEFAULT_SEARCH_RERANK)
    queries = [search_request(image_id=f"{p}/0", k=3, rerank=rerank) for p in PHOTOS]
    with RetrievalClient(cluster.broker_address) as client:
        resp = client.search_batch(queries, timeout_s=60)
    assert [r.status.code for r in resp.results] == [0] * len(queries), [r.status for r in resp.results]
    assert all(r.response.results for r in resp.results)


def test_a_failed_write_lists_the_ids_it_stored(cluster):
    """Last in the module: shard 1 is killed for good."""
    from services.space.placement import Placement

    cluster.kill_shard(1)
    ids = [f"w/{i}" for i in range(8)]
    on0 = [i for i in ids if Placement(2).shard_of(i) == 0]
    on1 = [i for i in ids if Placement(2).shard_of(i) == 1]
    assert on0 and on1
    with RetrievalClient(cluster.broker_address, retries=False) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.add_images([ImageToAdd(i, _jpeg("coins", 96)) for i in ids], batch_size=8, timeout_s=60)
        details = err.value.details()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, details
        assert "127.0.0.1" not in details and "ipv4:" not in details, details  # no internal address reaches a caller
        assert f"{len(on0)} images were stored" in details and all(repr(i) in details for i in ids), details
        stored_part, _, lost_part = details.partition("not confirmed")
        assert all(repr(i) in stored_part for i in on0) and all(repr(i) in lost_part and repr(i) not in stored_part for i in on1)
        deleted = client.delete(on0).deleted  # the ones reported stored are there
        assert sorted(deleted) == sorted(on0)
        lost = next(f"{p}/{i}" for p in PHOTOS for i in range(3) if Placement(2).shard_of(f"{p}/{i}") == 1)
        with pytest.raises(grpc.RpcError) as err:
            client.search(image_id=lost, k=3, timeout_s=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "127.0.0.1" not in err.value.details(), err.value.details()
