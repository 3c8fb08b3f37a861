"""The broker's settings: limits and defaults of the public API, rerank defaults, budgets."""

from __future__ import annotations

from dataclasses import dataclass

from services.common import limits
from services.rerank.diffusion import DiffusionParams
from services.rerank.verify import VerifyParams


def _parsed_quorum(quorum: str) -> str | int:
    """``"all"``, ``"majority"`` or a number >= 1 (ValueError naming ``write_quorum`` otherwise)."""
    if quorum in ("all", "majority"):
        return quorum
    try:
        n = int(quorum)
    except ValueError:
        raise ValueError(f"write_quorum: 'all', 'majority' or a number of replicas, got {quorum!r}") from None
    if n < 1:
        raise ValueError(f"write_quorum: {n} is not in 1..the replication factor")
    return n


def check_quorum_form(quorum: str) -> None:
    """The form of a write quorum, before the replication factor is known (when the
    configuration is read): ``all``, ``majority`` or a number >= 1."""
    _parsed_quorum(quorum)


def quorum_size(quorum: str, replicas: int) -> int:
    """Replicas that must store a write before it is acknowledged: ``all``, ``majority`` (more
    than half: 2 of 2, 2 of 3), or a number 1..replicas."""
    q = _parsed_quorum(quorum)
    if q == "all":
        return replicas
    if q == "majority":
        return replicas // 2 + 1
    if q > replicas:
        raise ValueError(f"write_quorum: {q} is not in 1..{replicas}")
    return int(q)


@dataclass(frozen=True)
class BrokerConfig:
    """Limits and defaults of the public API.

    Attributes
    ----------
    default_timeout_s : float
        Budget of a call that arrives without a deadline.
    max_k, max_offset : int
        Upper bounds of ``k`` and ``offset``.
    max_batch_images : int
        Largest AddImages batch message.
    whitening_sample : int
        Default sample size of FitWhitening.
    index_local : bool
        Extract and store local features of every added image (needed by verification).
    verify_candidates : int
        Default number V of top candidates geometrically verified (of each shortlist with
        ``verify-global``). 40 under the default ``regional-match,verify`` on a whitened
        collection: against 50 it cuts the verify stage by a fifth (101 → 74 ms p50 on the
        ROxford subset, 362 → 291 ms per query) and passes the selection protocol without a loss
        beyond its margin (held-out crops equal, whole photos −0.4 Medium, worst landmark −1.2;
        the 9 known queries +2.6 Medium, all of it one query's false verification left out;
        BENCHMARKS.md, "Fewer verified candidates, again"). 30 lost beyond the margin.
    max_verify_candidates : int
        Upper bound of a request's V.
    verify_threads : int
        Threads verifying candidate pairs in parallel (when the broker verifies).
    verify_on : {"shards", "broker"}
        Where candidate pairs are matched and fitted: on the shards that hold their local
        features (one ``Shard.Verify`` call per shard, default) or in the broker after reading
        the features (GetFeatures). Same results; ``broker`` moves ~50 KB per candidate.
    verify : VerifyParams
        Matching/RANSAC defaults.
    data_dir : str
        Where the collection model (local PCA, whitening) is persisted ("" = memory only).
    diffusion, regional_diffusion : DiffusionParams
        Defaults of global and regional diffusion.
    neighbourhood, regional_neighbourhood, max_neighbourhood : int
        Default (and maximum) truncated neighbourhood R diffused over.
    qe_n, qe_alpha : int, float
        αQE / DBA neighbours and weight exponent.
    dba_neighbourhood : int
        Neighbourhood augmented by DBA.
    shard_budget_fraction : float
        Each shard call (search, features) gets this fraction of the caller's remaining time;
        a shard slower than that is listed in ``missing_shards`` of a partial answer.
    shard_budget_s : float
        Absolute cap on a shard call's budget (0 = only the fraction); a shard search or a
        features batch takes milliseconds, so 2 s is slack, not a limit on healthy shards.
    max_inflight : int
        Calls the broker handles at once; beyond it RESOURCE_EXHAUSTED at once, with a retry hint.
    max_extract_queue : int
        Images of each class (search images, indexing images) allowed to wait for an extraction
        slot (``extract_slots_per_replica`` per replica run at once; searches take freed slots
        first); beyond it RESOURCE_EXHAUSTED at once, with a retry hint (0 = unbounded).
    rerank_slots : int
        Searches with rerank stages (verification, diffusion, expansion) the broker works on at
        once, each from its admission (before extraction) to its answer; a SearchBatch holds up
        to half of them (``services.broker.admission.RerankBudget``).
    max_rerank_queue : int
        Such searches allowed to wait for a rerank slot; beyond it RESOURCE_EXHAUSTED at once,
        with a retry hint, before any of the search's work (its extraction included).
    extract_slots_per_replica : int
        Extract calls in flight per extractor replica; the launcher raises it to the replicas'
        batch size so that their dynamic batches can fill.
    retry_after_ms : int
        The hint: ``grpc-retry-pushback-ms`` trailer and message of an overload answer.
    shutdown_grace_s : float
        On SIGTERM/SIGINT the broker turns NOT_SERVING and lets calls in flight finish for up
        to this long before the actors stop.
    features_batch : int
        Ids per GetFeatures call (local/regional features of one image can be ~0.3 MB, so a
        batch of this size stays far below the message limit).
    shard_health_period_s, shard_health_timeout_s : float
        Every ``period`` the broker calls each shard's Stats (``timeout`` each) and sets
        ``loupe_shard_up{shard}`` (services/broker/shard_health.py); the same rounds health-check
        the extractor replicas and look up the address of any backend that failed.
    shard_down_grace_s : float
        A shard that has not answered its health checks for this long turns the broker's
        ``loupe.shards`` health service NOT_SERVING (``loupe.v1.Retrieval`` keeps serving partial
        answers).
    extract_hedge_s : float
        An extraction with no answer after this long is sent to a second replica too, so a hung
        replica costs latency, not errors (0 = fail over only when a replica fails).
    """

    default_timeout_s: float = 30.0
    max_k: int = 1000
    max_offset: int = 10_000
    max_batch_images: int = 256
    whitening_sample: int = 20_000
    index_local: bool = True
    verify_candidates: int = 40
    max_verify_candidates: int = 1000
    verify_threads: int = 2
    verify_on: str = "shards"
    # min_inliers 16 measured best on the ROxford subset (4 → Medium 37.6, 10 → 43.1, 16 → 44.0);
    # MAGSAC up to 500 iterations, not 1000: on 627 ROxford query/candidate pairs the same pairs
    # verify (one more positive) at 0.4x the fitting time (BENCHMARKS.md, "Cheaper pairs")
    verify: VerifyParams = VerifyParams(min_inliers=16, max_iters=500)
    data_dir: str = ""
    diffusion: DiffusionParams = DiffusionParams(k=50, kq=10, alpha=0.99, gamma=3.0)
    regional_diffusion: DiffusionParams = DiffusionParams(k=50, kq=10, alpha=0.99, gamma=3.0, aggregate="max")
    neighbourhood: int = 1000
    regional_neighbourhood: int = 1000
    max_neighbourhood: int = 5000
    max_graph_k: int = 200
    graph_page: int = 4096
    qe_n: int = 2
    qe_alpha: float = 3.0
    dba_neighbourhood: int = 1000
    shard_budget_fraction: float = 0.5
    shard_budget_s: float = 2.0
    max_inflight: int = 128
    max_extract_queue: int = 8  # measured: ~4 image searches/s per replica here → ≤ ~2 s of queueing
    extract_slots_per_replica: int = 2
    rerank_slots: int = 4
    max_rerank_queue: int = 8
    retry_after_ms: int = 100
    features_batch: int = 32
    shutdown_grace_s: float = 5.0
    shard_health_period_s: float = 5.0
    shard_health_timeout_s: float = 2.0
    shard_down_grace_s: float = 60.0
    extract_hedge_s: float = 2.0
    write_quorum: str = "majority"
    replica_hedge_s: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.shard_budget_fraction <= 1:
            raise ValueError(f"broker.shard_budget_fraction must be in (0, 1], got {self.shard_budget_fraction}")
        for name in ("max_inflight", "features_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"broker.{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_extract_queue", "shard_budget_s", "extract_slots_per_replica", "rerank_slots", "max_rerank_queue"):
            if getattr(self, name) <= 0:
                raise ValueError(f"broker.{name} must be > 0, got {getattr(self, name)}")
        if self.shard_down_grace_s <= 0:
            raise ValueError(f"broker.shard_down_grace_s must be > 0, got {self.shard_down_grace_s}")
        check_quorum_form(self.write_quorum)
        if self.replica_hedge_s < 0:
            raise ValueError(f"broker.replica_hedge_s must be >= 0, got {self.replica_hedge_s}")
        if self.extract_hedge_s < 0:
            raise ValueError(f"broker.extract_hedge_s must be >= 0, got {self.extract_hedge_s}")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"broker.shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")
        for name in ("default_timeout_s", "max_k", "max_batch_images", "whitening_sample", "verify_candidates", "verify_threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"broker.{name} must be > 0, got {getattr(self, name)}")
        if self.verify_on not in ("shards", "broker"):
            raise ValueError(f"broker.verify_on must be 'shards' or 'broker', got {self.verify_on!r}")
        if self.max_batch_images > limits.MAX_WRITE_RECORDS:
            raise ValueError(f"broker.max_batch_images must be <= {limits.MAX_WRITE_RECORDS} (records in one shard write), got {self.max_batch_images}")


