"""What one search runs: the request's rerank options validated, merged over the server defaults and
laid out once as an ordered tuple of rerank stage objects (``services.broker.rerank_stages``)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from loupe.v1 import retrieval_pb2
from services.broker.config import BrokerConfig
from services.broker.rerank_stages import Diffuse, Expand, ExpandVerified, RegionalMatch, Stage, Verify
from services.common import limits
from services.common.errors import InvalidArgument
from services.rerank.diffusion import DiffusionParams
from services.rerank.verify import VerifyParams


@dataclass(frozen=True)
class SearchPlan:
    """What one search runs, after validation and defaults: its rerank stages in order.

    Attributes
    ----------
    stages : tuple of Stage
        Run in this order by ``SearchPipeline.finish`` (each when it ``applies``).
    depth : int
        Candidates every stage needs from the fan-out (besides the page itself).
    diffusion_stage : Diffuse or None
        The request's diffusion, also when no stage runs it (``diffuse_first`` without
        verification): results report a diffusion score and the query brings its regions.
    """

    stages: tuple[Stage, ...] = ()
    depth: int = 0
    diffusion_stage: Diffuse | None = None

    def _first(self, kind: type) -> Any:
        return next((s for s in self.stages if isinstance(s, kind)), None)

    @property
    def reranks(self) -> bool:
        """The search runs rerank stages: it holds a rerank slot (``services.broker.admission``)."""
        return bool(self.stages)

    @property
    def verify(self) -> VerifyParams | None:
        """Verification parameters (None: no verification): the query needs local features."""
        stage = self._first(Verify)
        return stage.params if stage is not None else None

    @property
    def diffusion(self) -> DiffusionParams | None:
        """Diffusion parameters (None: no diffusion asked)."""
        return self.diffusion_stage.params if self.diffusion_stage is not None else None

    @property
    def regional(self) -> bool:
        """Regional diffusion: the query needs its regional vectors."""
        return self.diffusion_stage is not None and self.diffusion_stage.regional

    @property
    def need_vectors(self) -> bool:
        """The fan-out must return each hit's indexed vector (expansion, global diffusion)."""
        return any(s.needs_vectors for s in (*self.stages, *filter(None, [self.diffusion_stage])))


def verify_params(opts: retrieval_pb2.VerifyOptions, config: BrokerConfig) -> VerifyParams | None:
    """Request options merged over the server defaults (None when the stage is off)."""
    if not opts.enabled:
        return None
    if opts.candidates < 0 or opts.candidates > config.max_verify_candidates:
        raise InvalidArgument(f"rerank.verify.candidates: must be in 0..{config.max_verify_candidates}, got {opts.candidates}")
    if opts.min_inliers < 0:
        raise InvalidArgument(f"rerank.verify.min_inliers: must be >= 0, got {opts.min_inliers}")
    changes: dict[str, object] = {}
    if opts.model:
        if opts.model not in limits.VERIFY_MODELS:
            raise InvalidArgument(f"rerank.verify.model: must be one of {list(limits.VERIFY_MODELS)}, got {opts.model[:32]!r}")
        changes["model"] = opts.model
    if opts.min_inliers:
        changes["min_inliers"] = opts.min_inliers
    try:
        return replace(config.verify, **changes)
    except ValueError as exc:
        raise InvalidArgument(f"rerank.verify: {exc}") from None


def build_plan(ro: retrieval_pb2.RerankOptions, config: BrokerConfig) -> SearchPlan:
    """Validate the rerank options ``ro``, merge them over the server defaults and lay out the
    stages in the order they run:

    1. ``Expand`` (αQE and/or DBA) when asked;
    2. ``RegionalMatch`` (global + best regional score over the regional neighbourhood) when asked;
    3. with verification and ``diffuse_first``: ``Diffuse``, unseeded;
    4. ``Verify`` (of the union with the global top-V when ``verify_global_too``);
    5. ``ExpandVerified`` when ``expand_verified``;
    6. without ``diffuse_first``: ``Diffuse`` seeded by the verified images; with it and
       ``reseed_after_verify``: the same, only when verification found a match.

    ``diffuse_first`` without verification runs no diffusion (its diffusion waits for a
    verification that never comes), as before stages were objects; the plan still records the
    diffusion asked (``diffusion_stage``).
    """
    verify = verify_params(ro.verify, config)
    diffuse: Diffuse | None = None
    if ro.diffuse.enabled:
        d = ro.diffuse
        if d.neighbourhood < 0 or d.neighbourhood > config.max_neighbourhood:
            raise InvalidArgument(f"rerank.diffuse.neighbourhood: must be in 0..{config.max_neighbourhood}, got {d.neighbourhood}")
        limits.check_int_range(d.k, "rerank.diffuse.k", 0, config.max_graph_k)
        if d.alpha:
            limits.check_finite_range(d.alpha, "rerank.diffuse.alpha", 0.0, 1.0, lo_open=True, hi_open=True)
        if d.gamma:
            limits.check_finite_range(d.gamma, "rerank.diffuse.gamma", 0.0, limits.MAX_DIFFUSION_GAMMA, lo_open=True)
        base = config.regional_diffusion if d.regional else config.diffusion
        changes = {name: getattr(d, name) for name in ("k", "alpha", "gamma") if getattr(d, name)}
        try:
            params = replace(base, **changes)
        except ValueError as exc:
            raise InvalidArgument(f"rerank.diffuse: {exc}") from None
        neighbourhood = d.neighbourhood or (config.regional_neighbourhood if d.regional else config.neighbourhood)
        diffuse = Diffuse(params, regional=d.regional, neighbourhood=neighbourhood, online_graph=d.online_graph)
    e = ro.expand
    limits.check_int_range(e.n, "rerank.expand.n", 0, config.max_neighbourhood)
    limits.check_finite_range(e.alpha, "rerank.expand.alpha", 0.0, limits.MAX_EXPANSION_ALPHA)
    for name in ("verify_global_too", "reseed_after_verify"):
        if getattr(ro, name) and not (verify is not None and diffuse is not None and ro.diffuse_first):
            raise InvalidArgument(f"rerank.{name}: needs rerank.verify, rerank.diffuse and rerank.diffuse_first")
    if ro.expand_verified and verify is None:
        raise InvalidArgument("rerank.expand_verified: needs rerank.verify")
    n_verify = (ro.verify.candidates or config.verify_candidates) if verify is not None else 0
    qe_n = e.n or config.qe_n

    stages: list[Stage] = []
    if e.query_expansion or e.database_augmentation:
        stages.append(Expand(qe=e.query_expansion, dba=e.database_augmentation, n=qe_n, alpha=e.alpha or config.qe_alpha,
                             dba_neighbourhood=config.dba_neighbourhood))
    if ro.regional_match:
        stages.append(RegionalMatch(config.regional_neighbourhood))
    if verify is not None and diffuse is not None and ro.diffuse_first:
        stages.append(diffuse)
    if verify is not None:
        stages.append(Verify(verify, n_verify, global_too=ro.verify_global_too))
    if ro.expand_verified:
        stages.append(ExpandVerified())
    if diffuse is not None and not ro.diffuse_first:
        stages.append(diffuse)
    elif diffuse is not None and ro.reseed_after_verify:
        stages.append(replace(diffuse, only_after_a_match=True))

    depth = max(n_verify, diffuse.neighbourhood if diffuse is not None else 0, qe_n if e.query_expansion else 0,
                config.dba_neighbourhood if e.database_augmentation else 0, config.regional_neighbourhood if ro.regional_match else 0)
    return SearchPlan(tuple(stages), depth, diffuse)


def validate_search(request: retrieval_pb2.SearchRequest, config: BrokerConfig) -> None:
    """Limits of a SearchRequest's own fields (the rerank options are checked by ``build_plan``)."""
    if not 1 <= request.k <= config.max_k:
        raise InvalidArgument(f"k: must be in 1..{config.max_k}, got {request.k}")
    if not 0 <= request.offset <= config.max_offset:
        raise InvalidArgument(f"offset: must be in 0..{config.max_offset}, got {request.offset}")
    which = request.WhichOneof("query")
    if which is None:
        raise InvalidArgument("query: set one of image, vector or id")
    if which == "image":
        limits.check_image_bytes(request.image, "image")
    elif which == "id":
        limits.check_id(request.id, "id")
    else:
        limits.check_vector(request.vector, "vector")
    if request.include_query and which != "id":
        raise InvalidArgument("include_query: only a search by id has a query image to include")
    limits.check_filter(request.filter, "filter")
    if request.HasField("crop"):
        if which != "image":
            raise InvalidArgument("crop: only an image query can be cropped")
        limits.check_crop(request.crop)
