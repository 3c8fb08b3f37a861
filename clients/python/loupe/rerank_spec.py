"""Parse rerank configuration names (``none``, ``verify``, ``diffuse``, ``verify,diffuse`` …).

A configuration is a comma-joined list of stage names; each maps to fields of
``loupe.v1.RerankOptions``. Stages always run in the server's fixed order. ``verify:N`` sets
the number of verified candidates V, ``diffuse:N`` / ``diffuse-regional:N`` the neighbourhood R.
Parameters ride along as ``key=value`` items: ``k=`` (kNN graph size), ``alpha=`` and ``gamma=``
for diffusion, ``inliers=`` (verification threshold) — e.g.
``verify,diffuse-regional,diffuse-first,k=30,alpha=0.95``.
"""

from __future__ import annotations

from loupe.v1 import retrieval_pb2

STAGES = {
    "none": "no reranking: global-descriptor order",
    "qe": "alpha-QE average query expansion",
    "dba": "database-side augmentation of the retrieved neighbourhood",
    "diffuse": "diffusion over the global kNN graph of the neighbourhood (from the collection graph when built)",
    "diffuse-online": "with diffuse / diffuse-regional: build the neighbourhood's kNN graph per query (ignore the collection graph)",
    "diffuse-regional": "diffusion over regional descriptors of the neighbourhood",
    "verify": "DELF local features + RANSAC geometric verification of the top candidates",
    "diffuse-first": "with verify: diffuse first, then verify the diffused top-V (default: verify, then diffuse seeded by verified images)",
    "verify-global": "with verify,diffuse-first: also verify the global top-V (the union of both shortlists)",
    "reseed": "with verify,diffuse-first: diffuse again after verification, seeded by the verified images",
    "qe-verified": "with verify: alpha-QE from the verified images only (second search), verified stay on top",
    "regional-match": "rescore the global top-R by global + best regional similarity (query crops match a region); later stages start from it",
}


DEFAULT_SEARCH_RERANK = "regional-match,verify"
"""Chosen with the selection protocol of bench/select_defaults.py on cropped held-out queries
(BENCHMARKS.md, "Learned whitening from verified pairs"), on a collection whitened from its own
verified pairs (what `loupe index` does by default, `loupe whiten verified`): against the previous
default (verify,diffuse-regional,diffuse-first,verify-global) +4.1 Medium / +13.0 Hard on 17
held-out crops, +8.9 / +12.1 on the same photos whole, +6.5 on the 9 known queries, and cheaper
(no diffusion; E/M/H 85.8 / 63.7 / 40.8 on the full ROxford subset, 347 vs 464 ms p50). The global
top-1000 is rescored by global + best regional similarity, then its top-V (50) verified."""


_FIELDS: dict[str, tuple[str, ...]] = {
    "none": (),
    "qe": ("expand.query_expansion",),
    "dba": ("expand.database_augmentation",),
    "diffuse": ("diffuse.enabled",),
    "diffuse-online": ("diffuse.online_graph", "diffuse.enabled"),  # alone: global diffusion on a per-query graph
    "diffuse-regional": ("diffuse.enabled", "diffuse.regional"),
    "verify": ("verify.enabled",),
    "diffuse-first": ("diffuse.enabled", "diffuse_first"),
    "verify-global": ("verify_global_too",),
    "reseed": ("reseed_after_verify",),
    "qe-verified": ("expand_verified",),
    "regional-match": ("regional_match",),
}
"""The boolean ``RerankOptions`` fields each stage name sets (the server orders the stages)."""

_SIZES = {"verify": "verify.candidates", "diffuse": "diffuse.neighbourhood", "diffuse-regional": "diffuse.neighbourhood"}
"""The count field of ``name:N``."""


def _set(opts: retrieval_pb2.RerankOptions, path: str, value: object) -> None:
    *parents, leaf = path.split(".")
    target = opts
    for name in parents:
        target = getattr(target, name)
    setattr(target, leaf, value)


def parse_rerank(spec: str) -> retrieval_pb2.RerankOptions:
    """``"verify,diffuse"`` → RerankOptions with both stages enabled.

    Raises
    ------
    ValueError
        Naming the unknown stage and listing the known ones.
    """
    opts = retrieval_pb2.RerankOptions()
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError("rerank: empty configuration (use 'none')")
    params = [n for n in names if "=" in n]
    names = [n for n in names if "=" not in n]
    if not names:
        raise ValueError("rerank: parameters without a stage (add e.g. 'diffuse-regional')")
    for item in names:
        name, _, arg = item.partition(":")
        if name not in _FIELDS:
            raise ValueError(f"rerank: unknown stage {name!r}; known: {', '.join(STAGES)}")
        if arg and (name not in _SIZES or not arg.isdigit() or int(arg) < 1):
            raise ValueError(f"rerank: {item!r}: only verify:N, diffuse:N and diffuse-regional:N take a positive count")
        for path in _FIELDS[name]:
            _set(opts, path, True)
        if name in _SIZES:
            _set(opts, _SIZES[name], int(arg or 0))
    for item in params:
        _set_param(opts, item)
    return opts


PARAMS = {
    "k": "diffusion: neighbours per node of the kNN graph",
    "alpha": "diffusion: alpha in (0, 1)",
    "gamma": "diffusion: affinity exponent > 0",
    "inliers": "verification: inliers needed to count as verified",
}


def _set_param(opts: retrieval_pb2.RerankOptions, item: str) -> None:
    """Apply one ``key=value`` item (range checks are the server's: it names the field)."""
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in PARAMS:
        raise ValueError(f"rerank: unknown parameter {key!r}; known: {', '.join(PARAMS)}")
    try:
        number = float(value) if key in ("alpha", "gamma") else int(value)
    except ValueError:
        raise ValueError(f"rerank: {item!r}: {key} takes a {'number' if key in ('alpha', 'gamma') else 'whole number'}") from None
    if key == "inliers":
        if not opts.verify.enabled:
            raise ValueError(f"rerank: {item!r} needs the verify stage")
        opts.verify.min_inliers = number
        return
    if not opts.diffuse.enabled:
        raise ValueError(f"rerank: {item!r} needs a diffusion stage")
    setattr(opts.diffuse, key, number)
