"""The cluster's side of a reshard (``services.broker.resharding.ShardFleet``): shard actors and layout files.

The broker calls it on its event loop; every Ray call runs on a worker thread, so the broker keeps
serving meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

import ray

from cluster.actors import shard_actor_name
from services.space.layout import Layout, write_layout
from services.space.placement import Placement

if TYPE_CHECKING:
    from cluster.launcher import Cluster

T = TypeVar("T")


class RayShardFleet:
    """Starts and stops a ``Cluster``'s shard replica sets and records its layout."""

    def __init__(self, cluster: "Cluster") -> None:
        self.cluster = cluster

    async def _off_loop(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, fn)

    async def start(self, shards: Sequence[int], placement: Placement) -> list[list[str]]:
        """Create the replica actors of ``shards`` (store directories ``shard_store_dir``, the
        cluster's replication factor) and wait until they serve; their addresses per shard."""
        def go() -> list[list[str]]:
            cfg = self.cluster.config
            rf = cfg.replication_factor
            have = len(self.cluster.shard_actors) // rf  # a reshard that failed after starting them left them running
            per_shard = [self.cluster.shard_actors[i * rf:(i + 1) * rf] if i < have else
                         self.cluster.new_shard_actors(i, placement.shards, placement.rule) for i in shards]
            refs = [a.address.remote() for actors in per_shard for a in actors]
            ready, pending = ray.wait(refs, num_returns=len(refs), timeout=cfg.startup_timeout_s)
            if pending:
                for actors in per_shard:
                    for a in actors:
                        ray.kill(a, no_restart=True)
                hint = f" (does a Ray node advertise shard_resource={cfg.shard_resource!r}?)" if cfg.shard_resource else ""
                raise TimeoutError(f"startup_timeout_s: {len(pending)} new shard replicas not ready after {cfg.startup_timeout_s} s{hint}")
            self.cluster.shard_actors.extend(a for i, actors in zip(shards, per_shard) if i >= have for a in actors)
            return [ray.get([a.address.remote() for a in actors]) for actors in per_shard]

        return await self._off_loop(go)

    async def record_layout(self, placement: Placement) -> None:
        """Every shard replica of the new collection records it, then the head's directory (the commit point)."""
        def go() -> None:
            cfg = self.cluster.config
            actors = [self.cluster.shard_actor(i, j) for i in range(placement.shards) for j in range(cfg.replication_factor)]
            ray.get([a.set_layout.remote(placement.shards, placement.rule) for a in actors], timeout=60)
            if cfg.data_dir:
                write_layout(cfg.data_dir, Layout(shards=placement.shards, placement=placement.rule))
            self.cluster.placement_rule = placement.rule
            self.cluster.config = dataclasses.replace(cfg, shards=max(cfg.shards, placement.shards))

        await self._off_loop(go)

    async def stop(self, shards: Sequence[int]) -> None:
        """Stop the replica actors of ``shards`` (snapshot, close) and release their names."""
        def go() -> None:
            cfg = self.cluster.config
            doomed = {(i, j): self.cluster.shard_actor(i, j) for i in shards for j in range(cfg.replication_factor)}
            ray.wait([a.stop.remote() for a in doomed.values()], num_returns=len(doomed), timeout=30)
            for actor in doomed.values():
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # already dead
                    pass
            self.cluster.shard_actors = [a for a in self.cluster.shard_actors if all(a is not d for d in doomed.values())]
            self.cluster.config = dataclasses.replace(cfg, shards=min(shards))
            _wait_released([shard_actor_name(i, j) for i, j in doomed], cfg.namespace)

        await self._off_loop(go)


def _wait_released(names: list[str], namespace: str, timeout_s: float = 15.0) -> None:
    """Wait until Ray has released ``names`` (a later growth creates actors of the same names)."""
    deadline = time.monotonic() + timeout_s
    for name in names:
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name, namespace=namespace)
            except ValueError:
                break
            time.sleep(0.05)

