"""The broker's shard health gauge on real parts: a real shard gRPC server, an address where
nothing listens, the broker's own create_server and its /metrics over HTTP."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client import generate_latest

from services.broker.backends import GrpcShardClient
from services.broker.metrics import BrokerMetrics
from services.broker.replicas import ReplicatedShard
from services.broker.servicer import BrokerConfig, create_server as create_broker
from services.broker.shard_health import ShardHealth
from services.common.grpc_server import ServerOptions
from services.index.servicer import create_server as create_shard
from services.index.store import StoredImage


def _dead_address() -> str:
    """host:port on loopback where nothing listens (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def shard(tmp_path):
    """A real Shard server (id 0) holding 3 images."""
    running, servicer = create_shard(0, ServerOptions(host="127.0.0.1", port=0), data_dir=str(tmp_path / "shard-000"))
    rng = np.random.default_rng(0)
    servicer.index.add([StoredImage(f"img{i}", rng.standard_normal(8).astype(np.float32), None, None) for i in range(3)])
    yield running
    running.stop(0)
    servicer.index.close()


def _value(metrics: BrokerMetrics, name: str, shard: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"shard": shard})


def test_a_round_marks_answering_shards_up_and_others_down(shard):
    metrics = BrokerMetrics.create()

    async def scenario() -> tuple[dict[int, bool], dict[int, bool]]:
        clients = [ReplicatedShard(0, [GrpcShardClient(0, f"127.0.0.1:{shard.port}")]),
                   ReplicatedShard(1, [GrpcShardClient(1, _dead_address())])]
        health = ShardHealth(clients, metrics, period_s=5.0, timeout_s=2.0)
        try:
            first = await health.check()
            shard.stop(0)  # shard 0 goes away
            second = await health.check()
        finally:
            for c in clients:
                await c.close()
        return first, second

    first, second = asyncio.run(scenario())
    assert first == {0: True, 1: False}
    assert second == {0: False, 1: False}
    assert _value(metrics, "loupe_shard_up", "0") == 0 and _value(metrics, "loupe_shard_up", "1") == 0
    # the answer of the first round refreshed the holdings; a failed round leaves them as they were
    assert _value(metrics, "loupe_shard_vectors", "0") == 3
    assert _value(metrics, "loupe_shard_store_bytes", "0") > 0
    assert _value(metrics, "loupe_shard_vectors", "1") is None
    assert 'loupe_shard_up{shard="1"} 0.0' in generate_latest(metrics.registry).decode()


def test_the_broker_runs_the_check_in_the_background_and_stops_it(shard):
    async def scenario() -> tuple[str, bool]:
        broker = await create_broker(
            [_dead_address()], [f"127.0.0.1:{shard.port}"], ServerOptions(host="127.0.0.1", port=0),
            config=BrokerConfig(shard_health_period_s=0.2, shard_health_timeout_s=1.0),
        )
        health = broker.shard_health
        assert health is not None and health.period_s == 0.2
        deadline = time.monotonic() + 30
        while health.rounds < 2 and time.monotonic() < deadline:  # bounded wait, not a timing assertion
            await asyncio.sleep(0.05)
        url = f"http://127.0.0.1:{broker.metrics_port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
        task = health._task
        await broker.stop(0.5)
        return body, task is not None and task.done() and health._task is None

    body, stopped = asyncio.run(scenario())
    assert 'loupe_shard_up{shard="0"} 1.0' in body
    assert 'loupe_shard_vectors{shard="0"} 3.0' in body
    assert stopped


@pytest.mark.parametrize("field", ["period_s", "timeout_s"])
def test_a_non_positive_period_or_timeout_is_refused_by_name(field):
    with pytest.raises(ValueError, match=f"shard_health_{field}"):
        ShardHealth([], BrokerMetrics.create(), **{field: 0})
