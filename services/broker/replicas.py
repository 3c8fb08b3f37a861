"""One shard as N replicas: quorum writes, hedged reads from in-sync replicas, catch-up.

``ReplicatedShard`` is the broker's ``ShardClient`` for a shard with one or more replica actors
(each a ``GrpcShardClient`` with its own store directory / volume). The rules:

- **Writes** (Add, Delete, SetWhitening) go to every replica at once. The caller is answered as
  soon as ``quorum`` replicas stored the write (``replicas`` in the answer says how many), or
  refused (UNAVAILABLE, "not stored") once the quorum cannot be reached. A replica that fails a
  write the caller was told is stored falls **out of sync**; one whose answer is still on its
  way is not read until it confirms (so a read after an acknowledgement always sees the write).
- **Reads** go to one in-sync replica (round robin), hedged to the next after
  ``hedge_after_s`` or at once when it fails: a dead, hung or slow replica costs neither recall
  nor the deadline. Paged reads whose cursor is replica-local (ListVectors, SampleVectors,
  ListVersions) stay on one in-sync replica while it stays in sync (a change of replica in the
  middle of a ListVectors paging may skip or repeat images: the graph build that pages is rerun).
- **Catch-up**: a replica out of sync (it missed an acknowledged write, its store id changed —
  a new volume —, or its digest disagrees with its peers' while no write is in flight) is merged
  with an in-sync peer (``services.broker.catch_up``) while it keeps receiving live writes; it
  serves reads again once a merge completed during which it failed no write.

With one replica (replication factor 1) this is a thin pass-through: reads and writes go to it,
and it never leaves the in-sync state (there is nobody to catch up from).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from loupe.v1 import shard_pb2
from services.broker.backend_errors import failure_reason
from services.broker.backends import ShardClient
from services.broker.catch_up import merge
from services.broker.config import quorum_size
from services.broker.members import hedged
from services.common.errors import DeadlineExceeded, Overloaded, Unavailable

log = logging.getLogger(__name__)
R = TypeVar("R")

def _replica_failure(exc: BaseException) -> bool:
    """Failures another replica may not have: it is gone, moved, hung, overloaded or full (the
    shard clients raise domain errors, ``services.broker.backend_errors``)."""
    return isinstance(exc, (Unavailable, DeadlineExceeded, Overloaded))


@dataclass
class ReplicaState:
    """What the broker knows of one replica."""

    in_sync: bool = True
    store_id: str = ""
    lagging: set[int] = field(default_factory=set)  # acknowledged writes it has not confirmed yet
    missed: int = 0  # acknowledged writes it failed since it fell out of sync (its lag, in writes)
    catching_up: bool = False
    failed_during_catch_up: bool = False
    progress: float = 1.0  # of the running catch-up: ids compared / ids expected
    suspect: bool = False  # failed its last call or check: tried last
    up: bool = True
    stats: shard_pb2.ShardStatsResponse | None = None

    @property
    def readable(self) -> bool:
        return self.in_sync and not self.lagging and not self.catching_up

    @property
    def state(self) -> str:
        """"in_sync", "catching_up", "out_of_sync" or "down" (for stats and metrics)."""
        if not self.up:
            return "down"
        if self.catching_up:
            return "catching_up"
        return "in_sync" if self.readable else "out_of_sync"


class ReplicatedShard:
    """A ``ShardClient`` over the replicas of one shard (see the module docstring).

    Parameters
    ----------
    shard_id : int
    replicas : sequence of ShardClient
        One client per replica (replica j at index j).
    write_quorum : str
        "all", "majority" or a number (``quorum_size``).
    hedge_after_s : float
        A read unanswered after this long is sent to the next in-sync replica too (0 = only on failure).
    whitening : callable or None
        The collection whitening to install on a caught-up replica whose whitening differs from
        its peer's (``SetWhiteningRequest.whitening`` bytes; None = unknown, leave it).
    on_change : callable or None
        Called after any replica's state changed (metrics).
    """

    def __init__(self, shard_id: int, replicas: Sequence[ShardClient], write_quorum: str = "majority", hedge_after_s: float = 0.1,
                 whitening: Callable[[], bytes | None] | None = None, on_change: Callable[["ReplicatedShard"], None] | None = None) -> None:
        if not replicas:
            raise ValueError(f"shard {shard_id}: at least one replica is required")
        self.shard_id = shard_id
        self.replicas = list(replicas)
        self.quorum = quorum_size(write_quorum, len(self.replicas))
        self.hedge_after_s = hedge_after_s
        # one copy is in sync by definition; several are not read until a first health round
        # compared them (``check``): a new empty replica must not answer for the shard
        self.states = [ReplicaState(in_sync=len(self.replicas) == 1) for _ in self.replicas]
        self._compared = len(self.replicas) == 1
        self.whitening = whitening
        self._on_change = on_change
        self._rr = itertools.count()
        self._pinned: int | None = None
        self._write_ids = itertools.count(1)
        self._writes_in_flight = 0
        self._writes_done = 0
        self._catch_ups: dict[int, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._digest_mismatch_rounds = 0

    # --- identity -----------------------------------------------------------------------
    @property
    def address(self) -> str:
        """The addresses of the replicas, comma-separated (logs, stats)."""
        return ",".join(r.address for r in self.replicas)

    def readable_replicas(self) -> list[int]:
        """Indexes of the replicas reads may go to now."""
        return [i for i, s in enumerate(self.states) if s.readable]

    # --- reads --------------------------------------------------------------------------
    def _read_order(self, pinned: bool = False) -> list[int]:
        ok = self.readable_replicas()
        if not ok and len(self.replicas) == 1:
            ok = [0]  # a single copy is read whatever happened to it: there is no other
        if not ok:
            return []
        if pinned:  # the same replica for every page while it stays readable (cursors are replica-local)
            if self._pinned not in ok:
                self._pinned = ok[0]
            return [self._pinned]
        if not pinned:
            first = next(self._rr) % len(ok)
            ok = ok[first:] + ok[:first]
        return [i for i in ok if not self.states[i].suspect] + [i for i in ok if self.states[i].suspect]

    async def _read(self, call: Callable[[ShardClient, float], Awaitable[R]], timeout_s: float, pinned: bool = False) -> R:
        order = self._read_order(pinned)
        if not order:
            raise Unavailable(f"shard {self.shard_id}: no replica is in sync ({self._describe_states()})")

        running: set[int] = set()

        def attempt(i: int) -> Callable[[float], Awaitable[R]]:
            async def run(t: float) -> R:
                running.add(i)
                try:
                    result = await call(self.replicas[i], t)
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:
                    running.discard(i)
                    if _replica_failure(exc):
                        self.states[i].suspect = True
                    raise
                running.discard(i)
                self.states[i].suspect = False
                return result
            return run

        attempts = [attempt(i) for i in (order[:1] if pinned else order)]
        if len(attempts) == 1:
            return await attempts[0](timeout_s)
        try:
            return await hedged(attempts, timeout_s, self.hedge_after_s, retryable=_replica_failure)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"shard {self.shard_id}: no replica answered within {timeout_s:.2f} s") from None
        finally:
            # replicas still running were outrun by one started after them (the hedge): tried last
            # from the next read on, until they answer a call or a health check
            for i in running:
                self.states[i].suspect = True

    def _describe_states(self) -> str:
        return ", ".join(f"replica {i}: {s.state}" for i, s in enumerate(self.states))

    async def search(self, request: shard_pb2.ShardSearchRequest, timeout_s: float) -> shard_pb2.ShardSearchResponse:
        return await self._read(lambda r, t: r.search(request, t), timeout_s)

    async def search_batch(self, request: shard_pb2.ShardSearchBatchRequest, timeout_s: float) -> shard_pb2.ShardSearchBatchResponse:
        return await self._read(lambda r, t: r.search_batch(request, t), timeout_s)

    async def get_features(self, request: shard_pb2.GetFeaturesRequest, timeout_s: float) -> shard_pb2.GetFeaturesResponse:
        return await self._read(lambda r, t: r.get_features(request, t), timeout_s)

    async def get_info(self, request: shard_pb2.GetInfoRequest, timeout_s: float) -> shard_pb2.GetInfoResponse:
        return await self._read(lambda r, t: r.get_info(request, t), timeout_s)

    async def list_ids(self, request: shard_pb2.ListIdsRequest, timeout_s: float) -> shard_pb2.ListIdsResponse:
        return await self._read(lambda r, t: r.list_ids(request, t), timeout_s)

    async def list_versions(self, request: shard_pb2.ListVersionsRequest, timeout_s: float) -> shard_pb2.ListVersionsResponse:
        return await self._read(lambda r, t: r.list_versions(request, t), timeout_s, pinned=True)

    async def get_records(self, request: shard_pb2.GetRecordsRequest, timeout_s: float) -> shard_pb2.GetRecordsResponse:
        return await self._read(lambda r, t: r.get_records(request, t), timeout_s)

    async def verify(self, request: shard_pb2.ShardVerifyRequest, timeout_s: float) -> shard_pb2.ShardVerifyResponse:
        return await self._read(lambda r, t: r.verify(request, t), timeout_s)

    async def sample_vectors(self, request: shard_pb2.SampleVectorsRequest, timeout_s: float) -> shard_pb2.SampleVectorsResponse:
        return await self._read(lambda r, t: r.sample_vectors(request, t), timeout_s, pinned=True)

    async def list_vectors(self, request: shard_pb2.ListVectorsRequest, timeout_s: float) -> shard_pb2.ListVectorsResponse:
        # the cursor is a label of one replica's store: every page from the same replica
        return await self._read(lambda r, t: r.list_vectors(request, t), timeout_s, pinned=True)

    async def stats(self, timeout_s: float) -> shard_pb2.ShardStatsResponse:
        return await self._read(lambda r, t: r.stats(t), timeout_s)

    # --- writes -------------------------------------------------------------------------
    async def add(self, request: shard_pb2.ShardAddRequest, timeout_s: float) -> shard_pb2.ShardAddResponse:
        resp, n = await self._write(lambda r, t: r.add(request, t), timeout_s, "write")
        resp.replicas = n
        return resp

    async def delete(self, request: shard_pb2.ShardDeleteRequest, timeout_s: float) -> shard_pb2.ShardDeleteResponse:
        resp, n = await self._write(lambda r, t: r.delete(request, t), timeout_s, "delete")
        resp.replicas = n
        return resp

    async def set_whitening(self, request: shard_pb2.SetWhiteningRequest, timeout_s: float) -> shard_pb2.SetWhiteningResponse:
        resp, _ = await self._write(lambda r, t: r.set_whitening(request, t), timeout_s, "whitening")
        return resp

    async def _write(self, call: Callable[[ShardClient, float], Awaitable[R]], timeout_s: float, what: str) -> tuple[R, int]:
        """Send to every replica; return (first answer, replicas that stored it) once ``quorum``
        stored it. Raises the replicas' own error when they refused it (INVALID_ARGUMENT, …) or
        ``Unavailable`` when the quorum cannot be reached."""
        write_id = next(self._write_ids)
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(call(r, timeout_s)) for r in self.replicas]
        self._writes_in_flight += 1
        stored: list[int] = []
        failed: dict[int, BaseException] = {}
        first: R | None = None
        pending = set(tasks)
        try:
            while pending and len(stored) < self.quorum and len(stored) + len(pending) >= self.quorum:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    i = tasks.index(t)
                    if t.exception() is None:
                        stored.append(i)
                        first = t.result() if first is None else first
                        self.states[i].suspect = False
                    else:
                        failed[i] = t.exception()
                        if _replica_failure(failed[i]):
                            self.states[i].suspect = True
        except asyncio.CancelledError:
            for t in pending:
                t.cancel()
            self._writes_in_flight -= 1
            raise
        acknowledged = len(stored) >= self.quorum
        if acknowledged:
            for i, exc in failed.items():
                self._fall_behind(i, f"failed an acknowledged {what} ({_reason(exc)})")
            for t in pending:  # still on their way: not read until they confirm
                i = tasks.index(t)
                self.states[i].lagging.add(write_id)
                t.add_done_callback(lambda t, i=i: self._confirmed_late(i, write_id, t, what))
        else:
            for t in pending:
                t.add_done_callback(_swallow)
        if pending:
            self._track(asyncio.gather(*pending, return_exceptions=True), then=self._write_finished)
        else:
            self._write_finished()
        if acknowledged:
            assert first is not None
            return first, len(stored)
        refusals = [e for e in failed.values() if not _replica_failure(e)]
        if refusals:
            raise refusals[0]  # the replicas' verdict on the request itself (e.g. INVALID_ARGUMENT)
        if not stored and failed:
            raise next(iter(failed.values()))  # nowhere stored: the failure as it is (full disk, deadline, …)
        reasons = "; ".join(f"replica {i}: {_reason(e)}" for i, e in sorted(failed.items()))
        raise Unavailable(
            f"shard {self.shard_id}: the {what} reached {len(stored)} of {len(self.replicas)} replicas, the write quorum is "
            f"{self.quorum}: not stored ({reasons})"
        )

    def _write_finished(self, *_: object) -> None:
        self._writes_in_flight -= 1
        self._writes_done += 1

    def _confirmed_late(self, i: int, write_id: int, task: "asyncio.Task[Any]", what: str) -> None:
        state = self.states[i]
        state.lagging.discard(write_id)
        if task.cancelled() or task.exception() is not None:
            exc = None if task.cancelled() else task.exception()
            self._fall_behind(i, f"failed an acknowledged {what} ({_reason(exc) if exc else 'cancelled'})")
        else:
            self._changed()

    def _fall_behind(self, i: int, why: str) -> None:
        """Replica ``i`` lacks an acknowledged write: no reads until a catch-up completes."""
        if len(self.replicas) == 1:
            return  # the only copy: nothing to catch up from, and nothing else to read
        state = self.states[i]
        state.missed += 1
        if state.catching_up:
            state.failed_during_catch_up = True
        if state.in_sync:
            log.warning("shard %d replica %d is out of sync: %s", self.shard_id, i, why)
            state.in_sync = False
            self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self)

    # --- health and catch-up ------------------------------------------------------------
    async def check(self, timeout_s: float) -> list[bool]:
        """One health round: every replica's Stats at once. A failing replica is looked up again
        (it may have moved); a replica with a new store id, or one whose digest disagrees with
        an in-sync peer's twice in a row while no write is in flight, falls out of sync; replicas
        out of sync are caught up in the background. Returns each replica's liveness."""
        writes_before = (self._writes_done, self._writes_in_flight)
        results = await asyncio.gather(*(r.stats(timeout_s) for r in self.replicas), return_exceptions=True)
        alive: list[bool] = []
        for i, res in enumerate(results):
            state = self.states[i]
            ok = not isinstance(res, BaseException)
            alive.append(ok)
            if ok != state.up:
                state.up = ok
                self._changed()
            if not ok:
                state.suspect = True
                continue
            state.suspect = False
            state.stats = res
            if state.store_id and res.store_id != state.store_id:
                self._fall_behind(i, f"its store changed ({state.store_id[:8]} → {res.store_id[:8]}: a new or replaced volume)")
            state.store_id = res.store_id
        failed = [self.replicas[i] for i, ok in enumerate(alive) if not ok]
        if failed:
            await asyncio.gather(*(r.refresh() for r in failed), return_exceptions=True)
        if not self._compared and any(alive):
            self._first_comparison(alive)
        quiet = writes_before == (self._writes_done, self._writes_in_flight) and self._writes_in_flight == 0
        self._compare_digests(quiet)
        self._start_catch_ups()
        return alive

    def _first_comparison(self, alive: list[bool]) -> None:
        """Decide which replicas start in sync: those that answered with the digest of the one
        most ahead (newest write, then most ids); every other one catches up first."""
        answered = [i for i, ok in enumerate(alive) if ok]
        best = max(answered, key=self._ahead)
        digest = self.states[best].stats.digest  # type: ignore[union-attr]
        for i, state in enumerate(self.states):
            state.in_sync = i in answered and state.stats.digest == digest  # type: ignore[union-attr]
            if not state.in_sync:
                log.warning("shard %d replica %d starts out of sync (%s): it catches up from replica %d before it serves reads",
                            self.shard_id, i, "did not answer" if i not in answered else "its digest differs", best)
        self._compared = True
        self._changed()

    def _ahead(self, i: int) -> tuple[int, int]:
        """How far replica ``i`` is: its newest write version, then its ids (live and deleted)."""
        st = self.states[i].stats
        assert st is not None
        return st.max_version, st.images + st.tombstones

    def _compare_digests(self, quiet: bool) -> None:
        """Readable replicas should have equal digests; a mismatch seen in two quiet rounds in a
        row (no write in flight or finished between them) is real: the replica that is behind
        (older newest write, then fewer ids) is caught up from the other."""
        readable = [i for i in self.readable_replicas() if self.states[i].up and self.states[i].stats is not None]
        digests = {self.states[i].stats.digest for i in readable}  # type: ignore[union-attr]
        if not quiet or len(digests) <= 1:
            self._digest_mismatch_rounds = 0
            return
        self._digest_mismatch_rounds += 1
        if self._digest_mismatch_rounds < 2:
            return
        self._digest_mismatch_rounds = 0

        best = max(readable, key=self._ahead)
        for i in readable:
            if i != best and self.states[i].stats.digest != self.states[best].stats.digest:  # type: ignore[union-attr]
                self._fall_behind(i, f"its digest differs from replica {best}'s")

    def _start_catch_ups(self) -> None:
        sources = [i for i in self.readable_replicas() if self.states[i].up]
        if not sources:
            return
        for i, state in enumerate(self.states):
            if state.in_sync or not state.up or i in self._catch_ups:
                continue
            source = sources[0]
            task = asyncio.get_running_loop().create_task(self._catch_up(i, source), name=f"loupe-catch-up-{self.shard_id}-{i}")
            self._catch_ups[i] = task
            task.add_done_callback(lambda _t, i=i: self._catch_ups.pop(i, None))

    async def _catch_up(self, i: int, source: int) -> None:
        """Merge replica ``i`` with in-sync replica ``source`` until a merge completes during which
        ``i`` failed no write; then ``i`` serves reads again."""
        state = self.states[i]
        state.catching_up, state.progress = True, 0.0
        self._changed()
        t0 = time.monotonic()
        try:
            while True:
                state.failed_during_catch_up = False
                src_stats = self.states[source].stats
                expected = max(1, (src_stats.images + src_stats.tombstones) if src_stats else 1)

                def progress(compared: int) -> None:
                    state.progress = min(1.0, compared / expected)
                    self._changed()

                log.info("shard %d replica %d: catching up from replica %d", self.shard_id, i, source)
                report = await merge(self.shard_id, self.replicas[source], self.replicas[i], on_page=progress)
                await self._copy_whitening(i, source)
                if not state.failed_during_catch_up and not state.lagging:
                    break
                log.info("shard %d replica %d failed a write during its catch-up: merging again", self.shard_id, i)
            state.in_sync, state.missed, state.progress = True, 0, 1.0
            took = time.monotonic() - t0
            log.warning("shard %d replica %d is in sync again after %.1f s (%d ids compared, %d records and %d deletes copied to it, "
                        "%d records and %d deletes copied back)", self.shard_id, i, took, report.compared, report.records_to_b,
                        report.deletes_to_b, report.records_to_a, report.deletes_to_a)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a replica failed mid-merge: the next health round starts over
            log.warning("shard %d replica %d: catch-up from replica %d failed (%s); retried next round", self.shard_id, i, source, _reason(exc))
        finally:
            state.catching_up = False
            self._changed()

    async def _copy_whitening(self, i: int, source: int) -> None:
        """Install the collection whitening on replica ``i`` when its differs from ``source``'s."""
        if self.whitening is None:
            return
        got, want = await asyncio.gather(self.replicas[i].stats(30.0), self.replicas[source].stats(30.0))
        if got.whitening_crc == want.whitening_crc:
            return
        payload = self.whitening()
        if payload is None:
            return
        await self.replicas[i].set_whitening(shard_pb2.SetWhiteningRequest(shard_id=self.shard_id, whitening=payload), 300.0)

    # --- lifecycle ----------------------------------------------------------------------
    async def refresh(self) -> bool:
        moved = await asyncio.gather(*(r.refresh() for r in self.replicas), return_exceptions=True)
        return any(m is True for m in moved)

    def _track(self, work: Awaitable[Any], then: Callable[..., None] | None = None) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        if then is not None:
            task.add_done_callback(then)

    async def close(self) -> None:
        self._on_change = None  # closed (e.g. retired by a reshard): its state is nobody's business any more
        for task in list(self._catch_ups.values()) + list(self._background):
            task.cancel()
        for r in self.replicas:
            await r.close()


def _reason(exc: BaseException | None) -> str:
    return f"{failure_reason(exc)}: {exc}" if exc is not None else "?"


def _swallow(task: "asyncio.Task[Any]") -> None:
    if not task.cancelled():
        task.exception()
