"""SearchBatch: many queries in one call, answered in order, each with its own status.

The batch shares what can be shared and keeps per-query failures apart:

0. the answer must fit the message limit by construction: the sum over the queries of k times
   the worst-case result (``message_size.result_bytes``: id, 4 KiB of metadata, matches when
   asked) must fit, or the whole batch is refused up front with INVALID_ARGUMENT naming the
   limit and how many queries of that k fit (``check_batch_fits``);
1. every query is validated and planned alone (a bad option fails that query only); when any
   query reranks, the batch takes its share of the rerank budget before any extraction
   (``RerankBudget.hold_batch``: its first slot admitted like a search's — refused, the whole
   batch is RESOURCE_EXHAUSTED with a retry hint — then free slots up to half the budget), and
   its reranking queries run their stages at most that many at a time;
2. queries are prepared concurrently: image queries go to the extractors together (at most
   the pool's concurrency in flight, so a batch never trips the extraction-queue admission
   limit by itself; the replicas batch concurrent images), id queries read their stored
   features;
3. the first-stage fan-out is one ``SearchBatch`` call per shard for each group of queries whose
   shard answer fits the message limit (``SearchPipeline.fanout_batch``);
4. merge and rerank stages then run per query, concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import logging
import time

import grpc

from loupe.v1 import retrieval_pb2, types_pb2
from services.broker.admission import RerankBudget
from services.broker.config import BrokerConfig
from services.broker.deadlines import Deadline
from services.broker.search_pipeline import Query, SearchPipeline
from services.broker.search_plan import SearchPlan, build_plan, validate_search
from services.common import limits
from services.common.errors import InvalidArgument, public_details, status_for
from services.common.message_size import MessageBudget, result_bytes

log = logging.getLogger(__name__)


def query_status(exc: BaseException | None) -> retrieval_pb2.QueryStatus:
    """A query's outcome as a google.rpc.Status-like message (the code Search would answer)."""
    if exc is None:
        return retrieval_pb2.QueryStatus(code=grpc.StatusCode.OK.value[0])
    code = status_for(exc)
    if code is None:
        log.error("internal error in a SearchBatch query", exc_info=exc)
        return retrieval_pb2.QueryStatus(code=grpc.StatusCode.INTERNAL.value[0], message="internal error (see broker log)")
    details = public_details(str(exc))
    if details != str(exc):
        log.warning("a SearchBatch query answered %s: %s", code.name, exc)  # the addresses stay in the log
    return retrieval_pb2.QueryStatus(code=code.value[0], message=details)


def check_batch_fits(request: retrieval_pb2.SearchBatchRequest, budget: MessageBudget, max_k: int) -> None:
    """INVALID_ARGUMENT when the batch's answer could exceed the message limit: the sum over the
    queries of k (a k out of 1..max_k fails its query alone and counts 0) times the worst-case
    result size (with matches when the query asks for them)."""
    sizes = [(q.k if 1 <= q.k <= max_k else 0, result_bytes(q.return_matches)) for q in request.queries]
    need = sum(k * size for k, size in sizes)
    if need <= budget.bytes:
        return
    k = max(k for k, _ in sizes)
    size = max(size for _, size in sizes)
    results = sum(k for k, _ in sizes)
    raise InvalidArgument(
        f"queries: {len(sizes)} queries asking for {results} results in all, of up to {size} bytes each "
        f"({limits.MAX_METADATA_BYTES} bytes of metadata{' and the matches' if size > result_bytes() else ''}), exceed "
        f"{budget.describe()}: at most {max(1, budget.bytes // (k * size))} queries of k={k} per SearchBatch"
    )


class BatchSearcher:
    """Runs SearchBatch requests over a ``SearchPipeline``."""

    def __init__(self, pipeline: SearchPipeline, config: BrokerConfig, rerank: RerankBudget) -> None:
        self.pipeline = pipeline
        self.config = config
        self.budget = pipeline.budget
        self.rerank = rerank

    async def search(self, request: retrieval_pb2.SearchBatchRequest, deadline: Deadline) -> retrieval_pb2.SearchBatchResponse:
        """Answer every query of ``request`` in order."""
        with self.pipeline.routing.reads.running():  # a reshard retires a shard only after the searches that may ask it
            return await self._search(request, deadline)

    async def _search(self, request: retrieval_pb2.SearchBatchRequest, deadline: Deadline) -> retrieval_pb2.SearchBatchResponse:
        n = len(request.queries)
        if not 1 <= n <= limits.MAX_BATCH_QUERIES:
            raise InvalidArgument(f"queries: must hold 1..{limits.MAX_BATCH_QUERIES} queries, got {n}")
        check_batch_fits(request, self.budget, self.config.max_k)
        t_total = time.perf_counter()
        timings: list[types_pb2.StageTiming] = []
        errors: list[BaseException | None] = [None] * n
        plans: dict[int, SearchPlan] = {}
        for i, q in enumerate(request.queries):
            try:
                validate_search(q, self.config)
                plans[i] = build_plan(q.rerank, self.config)
            except Exception as exc:  # this query's own error; the others go on
                errors[i] = _prefixed(exc, i)
        reranking = sum(plan.reranks for plan in plans.values())
        async with self.rerank.hold_batch(reranking, deadline) as share:
            responses = await self._run(request, plans, errors, share, deadline, timings, t_total)
        out = retrieval_pb2.SearchBatchResponse()
        for i in range(n):
            r = out.results.add(status=query_status(errors[i]))
            if i in responses:
                r.response.CopyFrom(responses[i])
        dt = time.perf_counter() - t_total
        timings.append(types_pb2.StageTiming(stage="total", seconds=dt))
        out.timings.extend(timings)
        return out

    async def _run(self, request: retrieval_pb2.SearchBatchRequest, plans: dict[int, SearchPlan], errors: list[BaseException | None],
                   share: asyncio.Semaphore, deadline: Deadline, timings: list[types_pb2.StageTiming],
                   t_total: float) -> dict[int, retrieval_pb2.SearchResponse]:
        """Steps 2-4 for the planned queries; returns the responses by position (failures go to
        ``errors``). Reranking queries run their stages under one permit of ``share`` each."""
        p = self.pipeline
        query_timings: dict[int, list[types_pb2.StageTiming]] = {i: [] for i in plans}
        sem = asyncio.Semaphore(max(1, p.extractors.concurrency))

        async def prepare(i: int) -> Query:
            async with sem:
                return await p.prepare(request.queries[i], plans[i], deadline, query_timings[i])

        with p.stage("batch_prepare", timings):
            prepared = await asyncio.gather(*(prepare(i) for i in plans), return_exceptions=True)
        queries: dict[int, Query] = _successes(list(plans), prepared, errors)
        order = list(queries)
        with p.stage("batch_fanout", timings):
            fanned = await p.fanout_batch(
                [(queries[i], queries[i].depth(request.queries[i], plans[i]), plans[i].need_vectors) for i in order], deadline
            ) if order else []

        async def finish(i: int, got) -> retrieval_pb2.SearchResponse:
            per_shard, missing = got
            async with share if plans[i].reranks else contextlib.nullcontext():
                return await p.finish(request.queries[i], plans[i], queries[i], per_shard, missing, deadline, query_timings[i], t_total)

        jobs = _successes(order, fanned, errors)
        with p.stage("batch_rerank", timings):
            finished = await asyncio.gather(*(finish(i, got) for i, got in jobs.items()), return_exceptions=True)
        return _successes(list(jobs), finished, errors)


_FIELD_FIRST = re.compile(r"^[A-Za-z_][\w.\[\]]*:")  # "k: must be ..." → "queries[3].k: must be ..."


def _successes(indices: list[int], results: list, errors: list[BaseException | None]) -> dict:
    """Query position → result for the results that are not exceptions; each exception goes to
    ``errors`` under its position, prefixed with it (cancellation propagates)."""
    out = {}
    for i, res in zip(indices, results):
        if isinstance(res, BaseException):
            _reraise_cancel(res)
            errors[i] = _prefixed(res, i)
        else:
            out[i] = res
    return out


def _reraise_cancel(exc: BaseException) -> None:
    if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
        raise exc


def _prefixed(exc: BaseException, i: int) -> BaseException:
    """The error with the query's position in its message (``queries[3].k: ...``), same type."""
    if status_for(exc) is None:
        return exc
    try:
        text = str(exc)
        err = type(exc)(f"queries[{i}].{text}" if _FIELD_FIRST.match(text) else f"queries[{i}]: {text}")
    except TypeError:
        return exc
    if hasattr(exc, "retry_after_ms"):
        err.retry_after_ms = exc.retry_after_ms  # type: ignore[attr-defined]
    return err
