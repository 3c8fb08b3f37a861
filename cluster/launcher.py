"""Start and stop a loupe cluster: Ray actors for shards and extractors, the broker in-process.

The broker runs in the launching process on its own asyncio loop thread, so ``loupe up`` owns
the public port, the metrics port and the shutdown signal handling.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from typing import Any, Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.actors import REGISTRY_NAME, ExtractorActor, Registry, ShardActor, extractor_actor_name, shard_actor_name
from cluster.config import ClusterConfig, is_loopback
from cluster.prometheus_targets import TargetsWriter, targets_path
from cluster.shard_fleet import RayShardFleet
from services.broker.servicer import BrokerConfig, RunningBroker, create_server
from services.common.auth import AuthPolicy, new_internal_token, read_token_file, read_tokens_file
from services.common.grpc_server import ServerOptions
from services.common.threads import limit_numeric_threads
from services.common.tls import InternalTls
from services.space.layout import Layout, check_layout
from services.space.placement import PLACEMENT_VERSION, shard_member

log = logging.getLogger(__name__)


def _local_resources(cfg: ClusterConfig) -> dict[str, float]:
    """Custom resources a single-node (local) Ray must advertise so every actor fits."""
    res: dict[str, float] = {}
    for i in range(cfg.shards):
        for j in range(cfg.replication_factor):
            name = cfg.shard_resource_of(i, j)
            if name:
                res[name] = res.get(name, 0) + 1
    if cfg.extractor_resource:
        res[cfg.extractor_resource] = res.get(cfg.extractor_resource, 0) + cfg.replicas
    return res


@contextlib.contextmanager
def _ray_on_loopback(enabled: bool) -> Iterator[None]:
    """Make a local ``ray.init`` bind Ray's own servers to 127.0.0.1 (Ray 2.60).

    ``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough: Ray replaces a loopback
    node address with the machine's routable IP (``services.resolve_ip_for_localhost``) unless
    ``ray_constants.ENABLE_RAY_CLUSTER`` is off, as Ray itself does on macOS/Windows (env
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``, read once at import). With the routable IP the GCS,
    raylet and worker gRPC servers listen on every interface; with 127.0.0.1 they listen on
    loopback only (tests/integration/test_listening.py checks it). The flag is only consulted
    while the node starts, so it is restored afterwards.
    """
    if not enabled:
        yield
        return
    import ray._private.ray_constants as ray_constants

    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous


LOCAL_RAY_ATTEMPTS = 3
"""Tries of a local Ray start before giving up (each try can spend Ray's fixed 30 s raylet wait)."""
GCS_PORT_WAIT_S = 120
"""How long a local start waits for the GCS to publish its port (Ray's default 30 s is too short
on a busy 2-core machine: "Timed out waiting for file .../gcs_server_port_..."); an operator's
own ``RAY_gcs_server_port_wait_time_s`` wins."""


def start_local_ray(**init_kwargs: Any) -> None:
    """``ray.init`` of a new local Ray instance that survives a busy machine.

    A local start can time out in several places (the GCS port file, the raylet registering with
    the GCS, ...), each with its own message; every failure of a start is logged with its cause
    and retried after ``ray.shutdown()``, up to ``LOCAL_RAY_ATTEMPTS`` tries. The GCS port wait is
    raised to ``GCS_PORT_WAIT_S`` for the duration of the start.
    """
    previous = os.environ.get("RAY_gcs_server_port_wait_time_s")
    if previous is None:
        os.environ["RAY_gcs_server_port_wait_time_s"] = str(GCS_PORT_WAIT_S)
    try:
        for attempt in range(1, LOCAL_RAY_ATTEMPTS + 1):
            try:
                ray.init(**init_kwargs)
                return
            except Exception as exc:  # any start-up failure: Ray raises bare Exception/RuntimeError here
                if attempt == LOCAL_RAY_ATTEMPTS:
                    raise RuntimeError(f"local Ray did not start in {LOCAL_RAY_ATTEMPTS} tries; last error: {exc}") from exc
                log.warning("local Ray start %d of %d failed (%s: %s); retrying", attempt, LOCAL_RAY_ATTEMPTS, type(exc).__name__, exc)
                ray.shutdown()
                time.sleep(1.0 * attempt)
    finally:
        if previous is None:
            os.environ.pop("RAY_gcs_server_port_wait_time_s", None)


def _private_ray_token() -> None:
    """Give local Ray a token in a 0600 file (``RAY_AUTH_TOKEN_PATH``) unless the caller chose one.

    Left to itself, a local ``ray.init`` enables token auth and writes ``~/.ray/auth_token``
    world-readable (0644): any local user could join the cluster with it and reach loupe's
    actors. One token per process (Ray's token loader caches it), in a 0700 directory removed
    when the process exits.
    """
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or os.environ.get("RAY_AUTH_MODE", "token") != "token":
        return
    directory = tempfile.mkdtemp(prefix="loupe-ray-")  # mode 0700
    path = os.path.join(directory, "auth_token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = path
    atexit.register(shutil.rmtree, directory, True)


def init_ray(cfg: ClusterConfig) -> bool:
    """Connect to ``cfg.ray_address``, or start a local Ray for ``cfg``; returns whether this
    call started a local instance (whose owner shuts it down). Nothing is done, and False is
    returned, when this process is already connected: several clusters may then run, one after
    the other, on one Ray (each stops its own actors)."""
    env = {"env_vars": dict(cfg.env)}
    if ray.is_initialized():
        return False
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, namespace=cfg.namespace, runtime_env=env, log_to_driver=False)
        return False
    local_only = is_loopback(cfg.host)
    _private_ray_token()
    with _ray_on_loopback(local_only):
        start_local_ray(
            # a loopback-only cluster keeps Ray's own servers (GCS, raylet, workers,
            # autoscaler monitor, runtime-env agent) on loopback too; see _ray_on_loopback
            _node_ip_address="127.0.0.1" if local_only else None,
            namespace=cfg.namespace,
            runtime_env=env,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=256 * 1024 * 1024,
            # a local cluster is its own shard and extractor node
            resources=_local_resources(cfg),
            configure_logging=True,
            logging_level=logging.WARNING,
        )
    return True


class Cluster:
    """A running loupe cluster. Use as a context manager, or ``start()`` / ``stop()``.

    Attributes (after start)
    ------------------------
    broker_address : str
        host:port of the public Retrieval service.
    metrics_address : str
        host:port of the broker's Prometheus exporter (``/metrics``).
    targets_file : str
        Prometheus file_sd file naming every exporter (broker, shards, extractors), kept
        current while the cluster runs ("" without a data directory).
    shard_actors, extractor_actors : list of Ray actor handles.
    """

    def __init__(self, config: ClusterConfig, broker_config: BrokerConfig = BrokerConfig()) -> None:
        self.config = config
        self.broker_config = broker_config
        self.shard_actors: list[Any] = []
        self.extractor_actors: list[Any] = []
        self._registry: Any = None
        self._owns_ray = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._broker: RunningBroker | None = None
        self.broker_address = ""
        self.metrics_address = ""
        self.targets_file = ""
        self._targets: TargetsWriter | None = None
        self._public_auth: AuthPolicy | None = None
        self._internal_token = ""
        self.placement_rule = PLACEMENT_VERSION
        """The collection's placement rule (its layout file's; a new collection: the bucket rule)."""

    def __enter__(self) -> "Cluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- start ------------------------------------------------------------------------
    def start(self) -> "Cluster":
        if self.config.data_dir:  # refuse before anything starts when the shard count changed
            self.placement_rule = check_layout(self.config.data_dir, Layout(shards=self.config.shards, placement="")).placement
        self._load_auth()
        self._init_ray()
        try:
            self._start_actors()
            self._start_broker()
            self._start_targets()
        except BaseException:
            self.stop()
            raise
        return self

    def _init_ray(self) -> None:
        self._owns_ray = init_ray(self.config)

    def _load_auth(self) -> None:
        """Public tokens from ``auth_tokens_file``; the internal token from its file or, always
        otherwise, generated for this cluster.

        Only digests reach the actors (``AuthPolicy``); the broker keeps the internal token.
        """
        cfg = self.config
        if cfg.auth_tokens_file:
            self._public_auth = AuthPolicy.from_tokens(read_tokens_file(cfg.auth_tokens_file))
        # always on: without it anyone on the machine (or the network) could write or wipe a shard
        if cfg.internal_token_file:
            self._internal_token = read_token_file(cfg.internal_token_file, "internal_token_file")
        else:
            self._internal_token = new_internal_token()

    def _internal_auth(self) -> AuthPolicy | None:
        return AuthPolicy.internal(self._internal_token) if self._internal_token else None

    def _internal_tls(self) -> InternalTls | None:
        cfg = self.config
        if not cfg.internal_tls_cert_file:
            return None
        return InternalTls(cfg.internal_tls_cert_file, cfg.internal_tls_key_file, cfg.internal_tls_ca_file)

    def _internal_server_fields(self) -> dict[str, Any]:
        """``ServerOptions`` fields of shard/extractor servers: internal token, internal mutual TLS."""
        tls = self._internal_tls()
        return {"auth": self._internal_auth(), **(tls.server_fields() if tls else {})}

    def _start_actors(self) -> None:
        cfg = self.config
        # the registry lives on this (the head's) node: anywhere else, losing that node would lose
        # every address and make restarted actors fail at start (seen: a shard node took it along)
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self._registry = ray.remote(Registry).options(
            name=REGISTRY_NAME, namespace=cfg.namespace, num_cpus=0, scheduling_strategy=here
        ).remote()
        ray.get(self._registry.snapshot.remote())
        for i in range(cfg.shards):
            self.shard_actors.extend(self.new_shard_actors(i, cfg.shards, self.placement_rule))
        ext_res = {"resources": {cfg.extractor_resource: 1}} if cfg.extractor_resource else {}
        ext_cfg = cfg.extractor_config()
        ext_cls = ray.remote(ExtractorActor)
        ext_opts = ServerOptions(host=cfg.host, port=0, workers=4, max_concurrent_rpcs=64, **self._internal_server_fields())
        for i in range(cfg.replicas):
            self.extractor_actors.append(
                ext_cls.options(name=extractor_actor_name(i), namespace=cfg.namespace, num_cpus=0, max_restarts=-1, **ext_res).remote(
                    i, ext_opts, ext_cfg, cfg.extractor_threads, cfg.namespace, cfg.metrics_host, cfg.extractor_metrics_port,
                    cfg.extractor_resource, cfg.replicas,
                )
            )
        refs = [a.address.remote() for a in self.shard_actors + self.extractor_actors]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=cfg.startup_timeout_s)
        if pending:
            hint = f" (does a Ray node advertise shard_resource={cfg.shard_resource!r} / extractor_resource={cfg.extractor_resource!r}?)" if cfg.shard_resource or cfg.extractor_resource else ""
            raise TimeoutError(f"startup_timeout_s: {len(pending)} actors not ready after {cfg.startup_timeout_s} s{hint}")
        ray.get(ready)

    def new_shard_actors(self, shard: int, shards: int, placement: str) -> list[Any]:
        """Create the replica actors of shard ``shard`` (of a collection of ``shards`` placed by rule
        ``placement``), replica j at j; they answer ``address()`` once serving."""
        cfg = self.config
        opts = ServerOptions(host=cfg.host, port=0, **self._internal_server_fields())
        # replicas of a shard on different nodes: each asks its own resource (the chart: one worker
        # group per shard replica) and Ray spreads them where the resources allow; on a single node
        # (``loupe up``) they share it, each with its own store directory
        spread = {"scheduling_strategy": "SPREAD"} if cfg.replication_factor > 1 else {}
        actors = []
        for j in range(cfg.replication_factor):
            resource = cfg.shard_resource_of(shard, j)
            actors.append(
                ray.remote(ShardActor).options(
                    name=shard_actor_name(shard, j), namespace=cfg.namespace, num_cpus=0, max_restarts=-1, max_task_retries=0,
                    **({"resources": {resource: 1}} if resource else {}), **spread,
                ).remote(shard, opts, cfg.index_settings(), cfg.shard_store_dir(shard, j), cfg.namespace, cfg.metrics_host,
                         cfg.shard_metrics_port, cfg.shard_threads, resource, shards, j, placement)
            )
        return actors

    def _start_broker(self) -> None:
        cfg = self.config
        # The broker verifies candidates on its own thread pool (verify_on=broker): one OpenCV and
        # one BLAS thread per call avoid oversubscription (multi-threaded matching products
        # measured 1.7 → 5.9 ms median under load)
        limit_numeric_threads(1, openmp_too=False)
        snap = ray.get(self._registry.snapshot.remote())
        shard_addrs = [[snap["shard"][shard_member(i, j)] for j in range(cfg.replication_factor)] for i in range(cfg.shards)]
        ext_addrs = [snap["extractor"][i] for i in range(cfg.replicas)]
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="loupe-broker", daemon=True)
        self._loop_thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            create_server(
                ext_addrs,
                shard_addrs,
                ServerOptions(
                    host=cfg.host, port=cfg.port, tls_cert_file=cfg.tls_cert_file, tls_key_file=cfg.tls_key_file, auth=self._public_auth
                ),
                metrics_host=cfg.metrics_host or cfg.host,
                metrics_port=cfg.metrics_port,
                config=dataclasses.replace(
                    self.broker_config, data_dir=self.broker_config.data_dir or cfg.data_dir,
                    extract_slots_per_replica=max(self.broker_config.extract_slots_per_replica, cfg.extractor_batch_images),
                ),
                internal_token=self._internal_token,
                internal_tls=self._internal_tls(),
                lookup=self._lookup,
                placement_rule=self.placement_rule,
                fleet=RayShardFleet(self),
            ),
            self._loop,
        )
        self._broker = fut.result(timeout=60)
        host = cfg.host if cfg.host not in ("0.0.0.0", "::") else ray.util.get_node_ip_address()
        self.broker_address = f"{host}:{self._broker.port}"
        mhost = cfg.metrics_host or cfg.host
        mhost = mhost if mhost not in ("0.0.0.0", "::") else ray.util.get_node_ip_address()
        self.metrics_address = f"{mhost}:{self._broker.metrics_port}"

    async def _lookup(self, role: str, member_id: int) -> str | None:
        """A member's current address from the registry (the broker's loop awaits the Ray call)."""
        ref = self._registry.lookup.remote(role, member_id)
        return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout=5.0)

    def _start_targets(self) -> None:
        """Write ``<data_dir>/prometheus-targets.json`` and keep it current (actors may move)."""
        path = targets_path(self.config.data_dir)
        if not path:
            return
        registry = self._registry
        self._targets = TargetsWriter(path, self.metrics_address, lambda: ray.get(registry.metrics_snapshot.remote(), timeout=10)).start()
        self.targets_file = path

    # --- stop -------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the broker, the actors and (if this process started it) Ray. Idempotent."""
        if self._targets is not None:
            self._targets.stop()
            self._targets = None
        if self._broker is not None and self._loop is not None:
            try:
                grace = self.broker_config.shutdown_grace_s  # NOT_SERVING, then in-flight calls get this long
                asyncio.run_coroutine_threadsafe(self._broker.stop(grace), self._loop).result(timeout=grace + 10)
            except Exception:  # shutting down: a failing stop must not block the rest
                log.exception("broker stop failed")
            self._broker = None
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(timeout=10)
            self._loop.close()
            self._loop = None
        if ray.is_initialized():
            # shards snapshot their index and close their store before they are killed
            stops = [a.stop.remote() for a in self.shard_actors]
            if stops:
                ray.wait(stops, num_returns=len(stops), timeout=30)
            for actor in self.shard_actors + self.extractor_actors + ([self._registry] if self._registry else []):
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # already dead
                    pass
            self._wait_names_released()
            if self._owns_ray:
                ray.shutdown()
                self._owns_ray = False
        self.shard_actors, self.extractor_actors, self._registry = [], [], None

    def _wait_names_released(self, timeout_s: float = 15.0) -> None:
        """Wait until Ray has released the names of this cluster's actors, so that a cluster
        started next on the same Ray (a restarted ``loupe up --ray-address``) can take them."""
        cfg = self.config
        names = [REGISTRY_NAME] + [shard_actor_name(i, j) for i in range(cfg.shards) for j in range(cfg.replication_factor)]
        names += [extractor_actor_name(i) for i in range(cfg.replicas)]
        deadline = time.monotonic() + timeout_s
        for name in names:
            while time.monotonic() < deadline:
                try:
                    ray.get_actor(name, namespace=cfg.namespace)
                except ValueError:  # released
                    break
                time.sleep(0.05)

    def shard_actor(self, shard_id: int, replica: int = 0) -> Any:
        """The actor of replica ``replica`` of shard ``shard_id``."""
        return self.shard_actors[shard_id * self.config.replication_factor + replica]

    def kill_shard(self, shard_id: int, replica: int = 0) -> None:
        """Kill a shard replica's actor for good (used by failure tests and chaos drills)."""
        ray.kill(self.shard_actor(shard_id, replica), no_restart=True)

    def restart_shard(self, shard_id: int, replica: int = 0) -> None:
        """Kill a shard replica's actor and wait until Ray has restarted it (snapshot loaded, later store changes replayed)."""
        actor = self.shard_actor(shard_id, replica)
        old_pid = ray.get(actor.pid.remote(), timeout=30)
        ray.kill(actor, no_restart=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if ray.get(actor.pid.remote(), timeout=5) != old_pid:
                    return
            except ray.exceptions.RayError:  # dead or restarting
                pass
            time.sleep(0.2)
        raise TimeoutError(f"shard {shard_id} did not restart")
