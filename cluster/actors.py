"""Ray actors that host loupe's gRPC servers, and the registry that makes them discoverable."""

from __future__ import annotations

import dataclasses
import os

import ray

from services.common.grpc_server import ServerOptions

REGISTRY_NAME = "loupe-registry"


class Registry:
    """Named actor mapping roles to addresses: {"shard": {id: addr}, "extractor": {id: addr}},
    and to the addresses of their Prometheus exporters (``metrics_snapshot``)."""

    def __init__(self) -> None:
        self._addresses: dict[str, dict[int, str]] = {"shard": {}, "extractor": {}}
        self._metrics: dict[str, dict[int, str]] = {"shard": {}, "extractor": {}}
        self._starts: dict[tuple[str, int], int] = {}

    def register(self, role: str, member_id: int, address: str) -> int:
        """Record a member's gRPC address; returns how many times it has started (1 = first)."""
        self._addresses.setdefault(role, {})[member_id] = address
        self._starts[(role, member_id)] = self._starts.get((role, member_id), 0) + 1
        return self._starts[(role, member_id)]

    def register_metrics(self, role: str, member_id: int, address: str) -> None:
        """Record the host:port of a member's ``/metrics`` exporter."""
        self._metrics.setdefault(role, {})[member_id] = address

    def lookup_metrics(self, role: str, member_id: int) -> str | None:
        return self._metrics.get(role, {}).get(member_id)

    def metrics_snapshot(self) -> dict[str, dict[int, str]]:
        return {role: dict(members) for role, members in self._metrics.items()}

    def lookup(self, role: str, member_id: int) -> str | None:
        return self._addresses.get(role, {}).get(member_id)

    def snapshot(self) -> dict[str, dict[int, str]]:
        return {role: dict(members) for role, members in self._addresses.items()}


def shard_actor_name(shard: int, replica: int) -> str:
    """Ray actor name of a shard replica (replica 0 keeps the name of an unreplicated shard)."""
    return f"loupe-shard-{shard}" if replica == 0 else f"loupe-shard-{shard}-r{replica}"


def extractor_actor_name(replica: int) -> str:
    """Ray actor name of an extractor replica."""
    return f"loupe-extractor-{replica}"


def _advertised(host: str, port: int) -> str:
    """Address other processes use: the node IP when bound to all interfaces."""
    if host in ("0.0.0.0", "::", ""):
        host = ray.util.get_node_ip_address()
    return f"{host}:{port}"


def _threads_here(explicit: int, resource: str, members: int) -> int:
    """Threads of one member: ``explicit``, or this pod's CPU limit shared by the members of its
    role that fit on this node (its total of the role's custom ``resource``; without one, a
    single local node holds all ``members``). Computed inside the actor, on its own node."""
    from cluster.cpus import threads_per_member

    here = members
    if resource and not explicit:
        node = ray.get_runtime_context().get_node_id()
        for info in ray.nodes():
            if info.get("NodeID") == node:
                here = int(info.get("Resources", {}).get(resource, 1)) or 1
                break
    return threads_per_member(explicit, here)


def _normal_priority() -> None:
    """Ray starts workers niced; serving processes should compete on equal terms."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except (PermissionError, OSError):
        pass  # unprivileged: keep Ray's niceness


def _reuse_port(role: str, member_id: int, registry_namespace: str) -> int:
    """A restarted actor rebinds its previous port so clients reconnect transparently."""
    registry = ray.get_actor(REGISTRY_NAME, namespace=registry_namespace)
    previous = ray.get(registry.lookup.remote(role, member_id))
    return int(previous.rsplit(":", 1)[1]) if previous else 0


def _serve_metrics(role: str, member_id: int, registry_namespace: str, metrics: object, host: str, port: int) -> tuple[object, str]:
    """Start the actor's ``/metrics`` exporter and register its address.

    ``port`` 0 = any free port; a restarted actor rebinds its previous metrics port (when free)
    so scrape targets stay valid. Returns (the exporter, its advertised host:port).
    """
    from services.common.metrics import serve_metrics

    registry = ray.get_actor(REGISTRY_NAME, namespace=registry_namespace)
    previous = ray.get(registry.lookup_metrics.remote(role, member_id))
    server = None
    if previous and port == 0:
        try:
            server = serve_metrics(metrics.registry, host, int(previous.rsplit(":", 1)[1]))
        except OSError:
            server = None
    if server is None:
        server = serve_metrics(metrics.registry, host, port)
    addr = _advertised(host, server.port)
    ray.get(registry.register_metrics.remote(role, member_id, addr))
    return server, addr


class ShardActor:
    """Hosts one replica of one ``Shard`` gRPC server over its own store directory (reloaded when
    Ray restarts it); registered as member ``shard_member(shard, replica)`` of role "shard"."""

    def __init__(
        self, shard_id: int, opts: ServerOptions, settings: object, data_dir: str, namespace: str,
        metrics_host: str = "", metrics_port: int = 0, threads: int = 0, resource: str = "", members: int = 1, replica: int = 0,
        placement: str = "",
    ) -> None:
        import tempfile

        from services.common.metrics import ShardMetrics
        from services.common.threads import limit_numeric_threads
        from services.index.servicer import create_server
        from services.space.layout import Layout, check_layout
        from services.space.placement import PLACEMENT_VERSION, shard_member

        _normal_priority()
        self.threads = _threads_here(threads, resource, members)
        # faiss, OpenCV and BLAS (verification's matching) from one budget: Ray starts workers
        # with OMP_NUM_THREADS=1, and an unsized pool takes every core of the node
        limit_numeric_threads(self.threads)
        self._starts = 1
        metrics = ShardMetrics.create(shard_id, restarts=lambda: self._starts - 1)
        # no data directory: a private temporary one, gone with the cluster (and with a restart)
        self._temporary = "" if data_dir else tempfile.mkdtemp(prefix=f"loupe-shard-{shard_id}-r{replica}-")
        data_dir = data_dir or self._temporary
        # the directory (its own volume on Kubernetes) must have been written for this replica of
        # this shard, with a placement rule this build knows; the collection's shard count is the
        # head's to check (a reshard changes it while this actor's arguments, which a Ray restart
        # reuses, keep the count it was created with; ``set_layout`` records the new one)
        check_layout(data_dir, Layout(shards=members, placement="", shard=shard_id, replica=replica), check_count=False,
                     new_placement=placement or PLACEMENT_VERSION)
        self.data_dir, self.shard_id, self.replica = data_dir, shard_id, replica
        member = shard_member(shard_id, replica)
        port = _reuse_port("shard", member, namespace)
        try:
            self.running, self.servicer = create_server(
                shard_id, ServerOptions(**{**opts.__dict__, "port": port}), data_dir=data_dir, settings=settings, metrics=metrics
            )
        except (OSError, RuntimeError):
            self.running, self.servicer = create_server(shard_id, opts, data_dir=data_dir, settings=settings, metrics=metrics)
        self.addr = _advertised(opts.host, self.running.port)
        self._starts = ray.get(ray.get_actor(REGISTRY_NAME, namespace=namespace).register.remote("shard", member, self.addr))
        self.metrics_server, self.metrics_addr = _serve_metrics(
            "shard", member, namespace, metrics, metrics_host or opts.host, metrics_port
        )

    def address(self) -> str:
        return self.addr

    def pid(self) -> int:
        return os.getpid()

    def metrics_address(self) -> str:
        return self.metrics_addr

    def set_layout(self, shards: int, placement: str) -> None:
        """Record the collection's new layout in this replica's directory (a reshard's switch)."""
        from services.space.layout import Layout, write_layout

        write_layout(self.data_dir, Layout(shards=shards, placement=placement, shard=self.shard_id, replica=self.replica))

    def stop(self) -> None:
        """Stop serving, snapshot the index, close the store (and drop a temporary one)."""
        import shutil

        self.running.stop(1.0)
        self.metrics_server.close()
        if self.servicer.index is not None:
            self.servicer.index.close()
        if self._temporary:
            shutil.rmtree(self._temporary, ignore_errors=True)


class ExtractorActor:
    """Hosts one ``Extractor`` gRPC server with its own model copy."""

    def __init__(
        self, replica_id: int, opts: ServerOptions, config: object, threads: int, namespace: str,
        metrics_host: str = "", metrics_port: int = 0, resource: str = "", members: int = 1,
    ) -> None:
        import torch

        from services.common.metrics import ExtractorMetrics
        from services.extractor.servicer import create_server

        _normal_priority()
        # the backbone runtime gets ``threads``; torch keeps one thread for the small tensor
        # work around it unless torch runs the backbone itself
        threads = self.threads = _threads_here(threads, resource, members)
        torch.set_num_threads(threads if getattr(config, "runtime", "torch") == "torch" else 1)
        config = dataclasses.replace(config, threads=threads)  # type: ignore[type-var]
        self._starts = 1
        metrics = ExtractorMetrics.create(replica_id, capacity=opts.workers, restarts=lambda: self._starts - 1)
        self.running, self.servicer = create_server(config, opts, metrics)
        self.addr = _advertised(opts.host, self.running.port)
        self._starts = ray.get(ray.get_actor(REGISTRY_NAME, namespace=namespace).register.remote("extractor", replica_id, self.addr))
        self.metrics_server, self.metrics_addr = _serve_metrics(
            "extractor", replica_id, namespace, metrics, metrics_host or opts.host, metrics_port
        )

    def address(self) -> str:
        return self.addr

    def pid(self) -> int:
        return os.getpid()

    def metrics_address(self) -> str:
        return self.metrics_addr

    def stop(self) -> None:
        self.running.stop(1.0)
        self.servicer.close()
        self.metrics_server.close()
