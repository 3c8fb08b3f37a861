"""Bring two replicas of a shard to the same contents by comparing their version lists.

Both replicas list the version of every id's last write (live or a tombstone), in id order,
one page at a time (``ListVersions``); where one holds a newer version of an id than the other
(or the other has never seen it), the newer record is copied over (``GetRecords`` then ``Add``
with the record's own version) or the newer delete is replayed (``Delete`` with its version).
Both directions are merged, so the result does not depend on which replica was right; writes
that arrive meanwhile go to both replicas anyway, and every store keeps only the newest version
of an id (last writer wins), so a copy never overwrites a newer write and a delete never comes
back. A replica that is new and empty receives the whole shard this way (the "snapshot"), one
that missed writes only those ids — the listing itself is ~30 bytes per id.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable, Protocol

from loupe.v1 import shard_pb2
from services.common.limits import MAX_WRITE_RECORDS

log = logging.getLogger(__name__)

PAGE = 5000
"""Version entries per ``ListVersions`` page."""


class ReplicaCalls(Protocol):
    """The calls a merge makes on one replica."""

    async def list_versions(self, request: shard_pb2.ListVersionsRequest, timeout_s: float) -> shard_pb2.ListVersionsResponse: ...
    async def get_records(self, request: shard_pb2.GetRecordsRequest, timeout_s: float) -> shard_pb2.GetRecordsResponse: ...
    async def add(self, request: shard_pb2.ShardAddRequest, timeout_s: float) -> shard_pb2.ShardAddResponse: ...
    async def delete(self, request: shard_pb2.ShardDeleteRequest, timeout_s: float) -> shard_pb2.ShardDeleteResponse: ...


@dataclass
class MergeReport:
    """What a merge copied: records and tombstones, each way (``a``→``b`` and back)."""

    compared: int = 0
    records_to_b: int = 0
    deletes_to_b: int = 0
    records_to_a: int = 0
    deletes_to_a: int = 0

    @property
    def copied(self) -> int:
        return self.records_to_b + self.deletes_to_b + self.records_to_a + self.deletes_to_a


Entries = dict[str, tuple[int, bool]]


def _entries(page: shard_pb2.ListVersionsResponse, upto: str | None) -> Entries:
    return {i: (v, d) for i, v, d in zip(page.ids, page.versions, page.deleted) if upto is None or i <= upto}


def newer_in(src: Entries, dst: Entries) -> tuple[list[str], list[str]]:
    """Ids whose last write in ``src`` is newer than in ``dst``: (live records, deletes)."""
    live, deleted = [], []
    for image_id, (version, is_deleted) in src.items():
        held = dst.get(image_id)
        if held is None or held[0] < version:
            (deleted if is_deleted else live).append(image_id)
    return live, deleted


async def merge(shard_id: int, a: ReplicaCalls, b: ReplicaCalls, timeout_s: float = 30.0, page: int = PAGE,
                on_page: Callable[[int], None] | None = None) -> MergeReport:
    """Merge replicas ``a`` and ``b`` of shard ``shard_id`` (see the module docstring).

    ``timeout_s`` bounds each call; a failing call raises (the caller retries the whole merge,
    which is idempotent). ``on_page(ids compared so far)`` reports progress."""
    report = MergeReport()
    after = ""
    while True:
        req = shard_pb2.ListVersionsRequest(shard_id=shard_id, after=after, limit=page)
        pa, pb = await asyncio.gather(a.list_versions(req, timeout_s), b.list_versions(req, timeout_s))
        # compare only up to where both pages are complete; the rest comes with the next pages
        ends = [p.ids[-1] for p in (pa, pb) if not p.done and p.ids]
        upto = min(ends) if ends else None
        ea, eb = _entries(pa, upto), _entries(pb, upto)
        live_b, deletes_b = newer_in(ea, eb)
        live_a, deletes_a = newer_in(eb, ea)
        report.records_to_b += await _copy_records(shard_id, a, b, live_b, timeout_s)
        report.deletes_to_b += await _copy_deletes(shard_id, b, deletes_b, ea, timeout_s)
        report.records_to_a += await _copy_records(shard_id, b, a, live_a, timeout_s)
        report.deletes_to_a += await _copy_deletes(shard_id, a, deletes_a, eb, timeout_s)
        report.compared += len(ea.keys() | eb.keys())
        if on_page is not None:
            on_page(report.compared)
        if upto is None:
            return report
        after = upto


async def _copy_records(shard_id: int, src: ReplicaCalls, dst: ReplicaCalls, ids: list[str], timeout_s: float) -> int:
    """Copy the live records ``ids`` from ``src`` to ``dst`` with their versions; returns how many."""
    copied = 0
    while ids:
        resp = await src.get_records(shard_pb2.GetRecordsRequest(shard_id=shard_id, ids=ids[:MAX_WRITE_RECORDS]), timeout_s)
        if resp.consumed < 1:
            raise RuntimeError(f"shard {shard_id}: GetRecords answered no id of {len(ids)}")
        ids = ids[resp.consumed:]
        if resp.records:  # an answer fits one message, so its records fit one write
            await dst.add(shard_pb2.ShardAddRequest(shard_id=shard_id, records=resp.records), timeout_s)
            copied += len(resp.records)
    return copied


async def _copy_deletes(shard_id: int, dst: ReplicaCalls, ids: list[str], src: Entries, timeout_s: float) -> int:
    """Replay the deletes of ``ids`` (versions from ``src``) on ``dst``; returns how many."""
    for start in range(0, len(ids), MAX_WRITE_RECORDS):
        chunk = ids[start:start + MAX_WRITE_RECORDS]
        await dst.delete(shard_pb2.ShardDeleteRequest(shard_id=shard_id, ids=chunk, versions=[src[i][0] for i in chunk]), timeout_s)
    return len(ids)
