"""The broker's view of shard health: ``loupe_shard_up{shard}``, whatever Prometheus scrapes.

Why in the broker: in Kubernetes the shard pods' scrape targets are pods, not shards: a spare pod
(no shard on it) answers nothing, a shard that moved leaves a dead target behind, and a deleted
pod leaves no target at all, so ``up{role="shard"}`` says little about the shards. The broker
always knows every shard (id → address) and is always scraped, so it checks them itself: every
``period_s`` it calls each shard's ``Stats`` (the internal token and TLS of the broker's own
channel; ``timeout_s`` each, all shards at once) and sets ``loupe_shard_up`` to 1 (answered)
or 0 (failed or timed out). The same answer refreshes ``loupe_shard_vectors`` and
``loupe_shard_store_bytes``, which otherwise move only on GetStats.

The same rounds keep the broker's backends reachable when they move: a shard that fails its
check is looked up again in the registry (a restarted actor may be on another port or node), and
the extractor replicas get a gRPC health check each (``loupe_extractor_up{replica}``; a failing
replica is looked up again and tried last). A shard that has not answered for ``down_grace_s``
makes ``on_complete(False)`` fire (the broker sets its ``loupe.shards`` health service to
NOT_SERVING, for probes and alerts); ``on_complete(True)`` once every shard answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Callable, Sequence

from services.broker.backends import ExtractorPool
from services.broker.metrics import BrokerMetrics
from services.broker.replicas import ReplicatedShard

log = logging.getLogger(__name__)


class ShardHealth:
    """Periodic health check of every shard, published as broker gauges.

    Parameters
    ----------
    shards : sequence of ReplicatedShard
        The broker's shards (each over its replicas); read every round (a reshard changes it).
    metrics : BrokerMetrics
        Gauges ``shard_up``, ``shard_vectors``, ``shard_store_bytes`` are set here.
    period_s : float
        Seconds between two rounds (> 0).
    timeout_s : float
        Deadline of one shard's Stats call (> 0); capped at ``period_s``.
    extractors : ExtractorPool or None
        Replicas to health-check in the same rounds.
    down_grace_s : float
        A shard silent for this long makes the cluster incomplete (``on_complete(False)``).
    on_complete : callable ``(bool) -> None`` or None
        Told when completeness changes (and after the first round).
    observe_version : callable or None
        Told the newest write version the shards hold (the broker's ``VersionClock.observe``).
    """

    def __init__(self, shards: Sequence[ReplicatedShard], metrics: BrokerMetrics, period_s: float = 5.0, timeout_s: float = 2.0,
                 extractors: ExtractorPool | None = None, down_grace_s: float = 60.0,
                 on_complete: Callable[[bool], None] | None = None, observe_version: Callable[[int], None] | None = None) -> None:
        if period_s <= 0:
            raise ValueError(f"broker.shard_health_period_s must be > 0, got {period_s}")
        if timeout_s <= 0:
            raise ValueError(f"broker.shard_health_timeout_s must be > 0, got {timeout_s}")
        self.shards = shards  # the broker's own list: a reshard adds and retires shards
        self.metrics = metrics
        self.period_s = period_s
        self.timeout_s = min(timeout_s, period_s)
        self.rounds = 0
        self._task: asyncio.Task | None = None
        self._last: dict[int, bool] = {}
        self.extractors = extractors
        self.down_grace_s = down_grace_s
        self._on_complete = on_complete
        self._complete: bool | None = None
        self._started = time.monotonic()
        self._answered: dict[int, float] = {}
        self._observe_version = observe_version

    async def check(self) -> dict[int, bool]:
        """One round: every replica of every shard answers Stats at once (``ReplicatedShard.check``:
        failing replicas are looked up again, replicas out of sync are caught up); sets the
        gauges. A shard is up when one of its in-sync replicas answered. Returns {shard id: up}."""
        await asyncio.gather(*(s.check(self.timeout_s) for s in self.shards), return_exceptions=True)
        up: dict[int, bool] = {}
        for shard in self.shards:
            sid = str(shard.shard_id)
            answered = [st.stats for st in shard.states if st.up and st.stats is not None and (st.readable or len(shard.states) == 1)]
            ok = bool(answered)
            up[shard.shard_id] = ok
            self.metrics.shard_up.labels(sid).set(1 if ok else 0)
            self.metrics.observe_replicas(shard)
            if ok:
                res = answered[0]
                self.metrics.shard_vectors.labels(sid).set(res.images)
                self.metrics.shard_store_bytes.labels(sid).set(res.store_bytes)
                if self._observe_version is not None:
                    self._observe_version(max(a.max_version for a in answered))
            if self._last.get(shard.shard_id, True) != ok:
                if ok:
                    log.info("shard %s at %s answers again", sid, shard.address)
                else:
                    log.warning("shard %s at %s failed its health check (no in-sync replica answered)", sid, shard.address)
        self._last = up
        if self.extractors is not None:
            for i, ok in enumerate(await self.extractors.check(self.timeout_s)):
                self.metrics.extractor_up.labels(str(i)).set(1 if ok else 0)
        self._update_complete(up)
        self.rounds += 1
        return up

    def _update_complete(self, up: dict[int, bool]) -> None:
        now = time.monotonic()
        for sid, ok in up.items():
            if ok:
                self._answered[sid] = now
        silent = [sid for sid in up if now - self._answered.get(sid, self._started) >= self.down_grace_s]
        complete = not silent
        if complete != self._complete:
            if not complete:
                log.error("shards %s have not answered for %.0f s or more (broker.shard_down_grace_s)", silent, self.down_grace_s)
            self._complete = complete
            if self._on_complete is not None:
                self._on_complete(complete)

    def start(self) -> "ShardHealth":
        """Run rounds every ``period_s`` on the running event loop (the first one now)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loupe-shard-health")
        return self

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the checks; the gauges keep their last value
                log.exception("shard health round failed")
            await asyncio.sleep(self.period_s)

    async def stop(self) -> None:
        """Cancel the background rounds and wait for them to end (idempotent)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

