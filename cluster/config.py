"""The cluster's one frozen configuration: CLI flags, then ``LOUPE_*`` environment overrides."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from services.extractor.global_descriptor import GlobalConfig
from services.extractor.config import ExtractorConfig
from services.extractor.local_features import LocalConfig
from services.index.vector_index import IndexSettings
from services.space.regions import MAX_REGIONS_PER_IMAGE

GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296"


def _valid_resource(name: str, placeholders: tuple[str, ...] = ()) -> bool:
    """A custom Ray resource name: empty (none) or a plain identifier, not one of Ray's own;
    it may contain the ``{placeholder}`` fields named (each filled with a number)."""
    try:
        name = name.format(**{p: 0 for p in placeholders})
    except (KeyError, IndexError, ValueError):
        return False
    return name == "" or (name.replace("_", "").replace("-", "").isalnum() and name not in ("CPU", "GPU", "memory", "object_store_memory"))


def is_loopback(host: str) -> bool:
    """True for an interface only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    return host == "localhost" or host == "::1" or host.startswith("127.")


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(raw)


@dataclass(frozen=True)
class ClusterConfig:
    """Everything ``loupe up`` (or a temporary cluster) needs.

    Attributes
    ----------
    shards, replicas : int
        Number of index shards and extractor replicas (Ray actors).
    replication_factor : int
        Copies of every shard (the chart's ``loupe.replicationFactor``), each a shard actor with its
        own store directory (``shard_store_dir``), written to with the broker's write quorum and
        read from while in sync (``services/broker/replicas.py``).
    host : str
        Interface every server binds; "0.0.0.0" in a real cluster (then the node IP is advertised).
    port : int
        Broker gRPC port (0 = pick one).
    metrics_port : int
        Broker Prometheus port (0 = pick one).
    extractor_threads : int
        Backbone threads per extractor replica (0 = the CPU limit of the replica's own pod or
        machine, shared by the replicas placed there: ``cluster/cpus.py``).
    shard_threads : int
        faiss (OpenMP) threads of each shard's searches (0 = the CPU limit of the shard's own pod
        or machine, shared by the shards placed there). Ray starts
        its workers with ``OMP_NUM_THREADS=1``, so without this a shard searches on one core
        whatever its node has.
    extractor_runtime : {"torch", "onnxruntime", "openvino"}
        What runs the backbone in each replica (``ExtractorConfig.runtime``).
    extractor_query_runtime : {"", "torch", "onnxruntime", "openvino"}
        What runs search queries' backbone passes (``ExtractorConfig.query_runtime``; "" = the same).
    extractor_batch_images, extractor_batch_wait_ms : int, float
        Dynamic batching in each replica (``ExtractorConfig.batch_images`` / ``batch_wait_ms``).
    index_factory : str
        Each shard's global index: "auto" (exact below ``approx_min_images``, then an IVF-PQ
        index sized to the shard, trained in the background), "Flat" (always exact), or a faiss
        factory string trained from ``approx_min_images``.
    approx_min_images : int
        Images in a shard from which its approximate index is trained (0 = never).
    data_dir : str
        Where shards keep their stores (``shard-NNN/``) and the broker its collection model
        ("" = temporary directories, removed when the cluster stops).
    weights : str
        Backbone weights file ("" = packaged ImageNet EfficientNet-Lite0).
    attention : str
        Trained attention-head file ("" = keypoints scored by feature L2 norm).
    local_layer, local_scales : see ``LocalConfig`` (must match what the collection was indexed with).
    pooling, scales : see ``GlobalConfig``. R-MAC, 3 scales, at ``global_max_side`` 512 px
        measured best on the ROxford subset (BENCHMARKS.md).
    max_side : int
        Longest side of the working image (local features are extracted at this size).
    global_max_side : int
        Longest side at which the global descriptor is computed (≤ max_side).
    regional_from : {"working", "global"}
        Image the regional vectors (regional diffusion) are pooled from: the ``max_side``
        working image (default; its pass is shared with the local features; measured better
        than 512 px with k-means-reduced regions, BENCHMARKS.md) or the global descriptor's
        largest scale.
    regions_per_image : int
        k-means centroids kept per image's regional vectors (0 = every R-MAC region).
    query_local_max_side : int
        Working-image side of a search query's local features (0 = ``max_side``, as indexed).
    ray_address : str
        Join this Ray cluster ("" = start a local one).
    shard_resource, extractor_resource : str
        Custom Ray resource each shard actor / extractor replica asks one unit of ("" = none).
        A KubeRay worker group that advertises e.g. ``loupe_shard: N`` in
        ``rayStartParams.resources`` then receives the shards, and only it (deterministic
        placement; the Helm chart sets both). ``shard_resource`` may name each shard replica's
        own resource with ``{shard}`` and ``{replica}`` fields, e.g. ``loupe_shard_{shard}_r{replica}``:
        a worker group (and volume) per shard replica.
    metrics_host : str
        Interface of every Prometheus exporter: the broker's and each actor's ("" = same as ``host``).
    shard_metrics_port, extractor_metrics_port : int
        Port of each shard actor's / extractor replica's ``/metrics`` (0 = any free port; a
        restarted actor rebinds its previous one). Kubernetes sets fixed ports (e.g. 9091,
        9092): each worker pod hosts one actor of its role, so one port per worker group.
        A fixed port that is taken (several actors of a role on one machine) falls back to a
        free one; the targets file names the port bound.
    tls_cert_file, tls_key_file : str
        PEM certificate chain and key → TLS on the public broker port (both or neither).
    auth_tokens_file : str
        Bearer tokens of the public port, one ``ROLE TOKEN`` per line (ROLE read or write;
        write implies read). "" = authentication off, allowed only when ``host`` is loopback
        unless ``insecure_no_auth``.
    internal_token_file : str
        Cluster-internal token the shard and extractor servers require from the broker. With
        auth on and no file, a random one is generated per cluster (given to the actors
        through Ray, never on a command line).
    internal_tls_cert_file, internal_tls_key_file, internal_tls_ca_file : str
        Mutual TLS between the broker and the shards/extractors (all three or none): the
        actors serve with this certificate and require a client certificate signed by the CA;
        the broker presents the same certificate. It must name ``loupe-internal`` (a DNS SAN;
        the broker checks that name, whatever the actors' IPs) and allow both server and
        client authentication.
    insecure_no_auth : bool
        Allow binding beyond loopback without ``auth_tokens_file`` (e.g. behind a mesh that
        authenticates for you).
    """

    shards: int = 2
    replicas: int = 1
    replication_factor: int = 1
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0
    extractor_threads: int = 0
    shard_threads: int = 0
    extractor_runtime: str = ExtractorConfig.runtime
    extractor_query_runtime: str = ExtractorConfig.query_runtime
    extractor_batch_images: int = ExtractorConfig.batch_images
    extractor_batch_wait_ms: float = ExtractorConfig.batch_wait_ms
    index_factory: str = "auto"
    approx_min_images: int = IndexSettings().approx_min_images
    data_dir: str = ""
    weights: str = ""
    attention: str = ""
    local_layer: str = LocalConfig().layer
    local_scales: tuple[float, ...] = LocalConfig().scales
    pooling: str = "rmac"
    scales: tuple[float, ...] = GlobalConfig().scales
    max_side: int = 1024
    global_max_side: int = 512
    regional_from: str = "working"
    regions_per_image: int = 5
    query_local_max_side: int = 0
    ray_address: str = ""
    shard_resource: str = ""
    extractor_resource: str = ""
    metrics_host: str = ""
    shard_metrics_port: int = 0
    extractor_metrics_port: int = 0
    tls_cert_file: str = ""
    tls_key_file: str = ""
    auth_tokens_file: str = ""
    internal_token_file: str = ""
    internal_tls_cert_file: str = ""
    internal_tls_key_file: str = ""
    internal_tls_ca_file: str = ""
    insecure_no_auth: bool = False
    namespace: str = "loupe"
    startup_timeout_s: float = 300.0
    env: Mapping[str, str] = field(default_factory=lambda: {"GLIBC_TUNABLES": GLIBC_TUNABLES})

    def __post_init__(self) -> None:
        checks = {
            "shards": self.shards >= 1,
            "replicas": self.replicas >= 1,
            "replication_factor": self.replication_factor >= 1,
            "port": 0 <= self.port <= 65535,
            "metrics_port": 0 <= self.metrics_port <= 65535,
            "shard_metrics_port": 0 <= self.shard_metrics_port <= 65535,
            "extractor_metrics_port": 0 <= self.extractor_metrics_port <= 65535,
            "extractor_threads": self.extractor_threads >= 0,
            "shard_threads": self.shard_threads >= 0,
            "max_side": 32 <= self.max_side <= 8192,
            "global_max_side": 32 <= self.global_max_side <= self.max_side,
            "regional_from": self.regional_from in ("working", "global"),
            "regions_per_image": 0 <= self.regions_per_image <= MAX_REGIONS_PER_IMAGE,
            "query_local_max_side": self.query_local_max_side == 0 or 32 <= self.query_local_max_side <= self.max_side,
            "startup_timeout_s": self.startup_timeout_s > 0,
            "shard_resource": _valid_resource(self.shard_resource, ("shard", "replica")),
            "extractor_resource": _valid_resource(self.extractor_resource),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: invalid value {getattr(self, name)!r}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file, tls_key_file: give both or neither")
        if len({bool(self.internal_tls_cert_file), bool(self.internal_tls_key_file), bool(self.internal_tls_ca_file)}) != 1:
            raise ValueError("internal_tls_cert_file, internal_tls_key_file, internal_tls_ca_file: give all three or none")
        if not self.auth_tokens_file and not self.insecure_no_auth and not is_loopback(self.host):
            raise ValueError(
                f"auth_tokens_file: required when binding beyond loopback (host {self.host!r}); "
                "give --auth-tokens-file (LOUPE_AUTH_TOKENS_FILE), or --insecure-no-auth to serve without authentication"
            )
        self.global_config()  # validates pooling/scales/max_side
        self.extractor_config()  # validates the extractor's runtime and batching
        self.index_settings()
        self.local_config()

    def global_config(self) -> GlobalConfig:
        """The extractor's global-descriptor settings."""
        return GlobalConfig(pooling=self.pooling, scales=tuple(self.scales), max_side=self.global_max_side)

    def shard_store_dir(self, shard: int, replica: int) -> str:
        """Store directory of a shard replica under ``data_dir`` ("" = a temporary one): replica 0
        keeps the directory of an unreplicated shard, so raising the factor keeps existing data."""
        if not self.data_dir:
            return ""
        name = f"shard-{shard:03d}" if replica == 0 else f"shard-{shard:03d}-r{replica}"
        return os.path.join(self.data_dir, name)

    def shard_resource_of(self, shard: int, replica: int = 0) -> str:
        """The custom resource shard ``shard``'s replica ``replica`` asks for ("" = none)."""
        return self.shard_resource.format(shard=shard, replica=replica)

    def extractor_config(self) -> ExtractorConfig:
        """What each extractor replica computes, and how."""
        return ExtractorConfig(
            weights_path=self.weights, global_config=self.global_config(), local_config=self.local_config(), attention_path=self.attention,
            regional_max_side=self.regional_max_side(), regions_per_image=self.regions_per_image, runtime=self.extractor_runtime,
            query_local_max_side=self.query_local_max_side,
            query_runtime=self.extractor_query_runtime,
            batch_images=self.extractor_batch_images, batch_wait_ms=self.extractor_batch_wait_ms,
        )

    def regional_max_side(self) -> int:
        """The extractor's ``regional_max_side`` (0 = from the global descriptor's largest scale)."""
        return self.max_side if self.regional_from == "working" else 0

    def index_settings(self) -> IndexSettings:
        """Each shard's index policy."""
        return IndexSettings(factory=self.index_factory, approx_min_images=self.approx_min_images)

    def local_config(self) -> LocalConfig:
        """The extractor's local-feature settings."""
        return LocalConfig(layer=self.local_layer, scales=tuple(self.local_scales), max_side=self.max_side)

    @classmethod
    def build(cls, values: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> "ClusterConfig":
        """Config from explicit ``values`` overridden by ``LOUPE_<FIELD>`` environment variables.

        Raises ValueError naming the variable when an override does not parse.
        """
        environ = os.environ if environ is None else environ
        kwargs: dict[str, Any] = {k: v for k, v in values.items() if v is not None}
        for f in dataclasses.fields(cls):
            var = f"LOUPE_{f.name.upper()}"
            if var not in environ or f.name == "env":
                continue
            raw = environ[var]
            try:
                if f.type in ("int", int):
                    kwargs[f.name] = int(raw)
                elif f.type in ("float", float):
                    kwargs[f.name] = float(raw)
                elif f.type in ("bool", bool):
                    kwargs[f.name] = _parse_bool(raw)
                elif f.name in ("scales", "local_scales"):
                    kwargs[f.name] = tuple(float(x) for x in raw.split(","))
                else:
                    kwargs[f.name] = raw
            except ValueError:
                raise ValueError(f"{var}: cannot parse {raw!r} as {f.type}") from None
        return cls(**kwargs)
