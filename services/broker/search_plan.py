"""What one search runs: the request's rerank options validated and merged over the server defaults."""

from __future__ import annotations

from dataclasses import dataclass, replace

from loupe.v1 import retrieval_pb2
from services.broker.config import BrokerConfig
from services.common import limits
from services.common.errors import InvalidArgument
from services.rerank.diffusion import DiffusionParams
from services.rerank.verify import VerifyParams


@dataclass(frozen=True)
class SearchPlan:
    """What one search runs, after validation and defaults."""

    verify: VerifyParams | None
    n_verify: int
    diffusion: DiffusionParams | None
    regional: bool
    online_graph: bool  # global: build the neighbourhood graph per query despite a collection graph
    neighbourhood: int
    diffuse_first: bool
    verify_global_too: bool
    reseed_after_verify: bool
    expand_verified: bool
    qe: bool
    dba: bool
    qe_n: int
    qe_alpha: float
    depth: int

    @property
    def need_vectors(self) -> bool:
        """The fan-out must return each hit's indexed vector (expansion, global diffusion)."""
        return self.qe or self.dba or self.expand_verified or (self.diffusion is not None and not self.regional)


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
    """Validate the rerank options ``ro`` and merge them over the server defaults."""
    verify = verify_params(ro.verify, config)
    diffusion, regional, neighbourhood = None, False, 0
    online_graph = False
    if ro.diffuse.enabled:
        d = ro.diffuse
        if d.neighbourhood < 0 or d.neighbourhood > config.max_neighbourhood:
            raise InvalidArgument(f"rerank.diffuse.neighbourhood: must be in 0..{config.max_neighbourhood}, got {d.neighbourhood}")
        limits.check_int_range(d.k, "rerank.diffuse.k", 0, config.max_graph_k)
        if d.alpha:
            limits.check_finite_range(d.alpha, "rerank.diffuse.alpha", 0.0, 1.0, lo_open=True, hi_open=True)
        if d.gamma:
            limits.check_finite_range(d.gamma, "rerank.diffuse.gamma", 0.0, limits.MAX_DIFFUSION_GAMMA, lo_open=True)
        regional = d.regional
        online_graph = d.online_graph
        base = config.regional_diffusion if regional else config.diffusion
        changes = {name: getattr(d, name) for name in ("k", "alpha", "gamma") if getattr(d, name)}
        try:
            diffusion = replace(base, **changes)
        except ValueError as exc:
            raise InvalidArgument(f"rerank.diffuse: {exc}") from None
        neighbourhood = d.neighbourhood or (config.regional_neighbourhood if regional else config.neighbourhood)
    e = ro.expand
    limits.check_int_range(e.n, "rerank.expand.n", 0, config.max_neighbourhood)
    limits.check_finite_range(e.alpha, "rerank.expand.alpha", 0.0, limits.MAX_EXPANSION_ALPHA)
    for name in ("verify_global_too", "reseed_after_verify"):
        if getattr(ro, name) and not (verify is not None and diffusion is not None and ro.diffuse_first):
            raise InvalidArgument(f"rerank.{name}: needs rerank.verify, rerank.diffuse and rerank.diffuse_first")
    if ro.expand_verified and verify is None:
        raise InvalidArgument("rerank.expand_verified: needs rerank.verify")
    n_verify = (ro.verify.candidates or config.verify_candidates) if verify is not None else 0
    qe_n = e.n or config.qe_n
    depth = max(n_verify, neighbourhood, qe_n if e.query_expansion else 0, config.dba_neighbourhood if e.database_augmentation else 0)
    return SearchPlan(
        verify=verify,
        n_verify=n_verify,
        diffusion=diffusion,
        regional=regional,
        neighbourhood=neighbourhood,
        online_graph=online_graph,
        diffuse_first=ro.diffuse_first,
        verify_global_too=ro.verify_global_too,
        reseed_after_verify=ro.reseed_after_verify,
        expand_verified=ro.expand_verified,
        qe=e.query_expansion,
        dba=e.database_augmentation,
        qe_n=qe_n,
        qe_alpha=e.alpha or config.qe_alpha,
        depth=depth,
    )


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
