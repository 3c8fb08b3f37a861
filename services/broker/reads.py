"""Reads of stored records: GetImages (by id) and ListImages (a cursor over the collection).

List order and cursor: images are listed in id order (bytewise UTF-8, the key order of each
shard's ``ids`` table, and also Python's code-point order). The opaque cursor holds only the
last id returned (or examined): every shard is asked for its ids after it, the broker merges
the shards' answers in id order. Because the position is an id, not an offset or a label, it
stays valid under concurrent writes: an id that exists for the whole scan sorts either before
the cursor (already returned) or after it (returned later), exactly once; a replaced id keeps
its place; a deleted id simply stops appearing.

With a filter, each shard examines at most ``max_scan`` ids per call and says how far it got
(``scanned_to``); the page is cut at the smallest such position so it never skips ahead of a
shard, and may therefore hold fewer than ``page_size`` images (even none) before the end.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Sequence

from loupe.v1 import retrieval_pb2, shard_pb2
from services.broker.backends import ShardClient
from services.broker.config import BrokerConfig
from services.broker.deadlines import Deadline, shard_timeout
from services.broker.routing import Routing
from services.common import limits
from services.common.errors import InvalidArgument, Unavailable
from services.space.placement import Placement

_CURSOR_TAG = b"loupe-list-1\x00"


def encode_cursor(last_id: str) -> str:
    """The opaque cursor of a scan positioned after ``last_id``."""
    return base64.urlsafe_b64encode(_CURSOR_TAG + last_id.encode("utf-8")).decode("ascii").rstrip("=")


def decode_cursor(cursor: str, field: str = "cursor") -> str:
    """The last id a cursor holds ("" for the first page); InvalidArgument for anything else."""
    if not cursor:
        return ""
    bad = InvalidArgument(f"{field}: not a cursor returned by ListImages")
    if len(cursor) > limits.MAX_CURSOR_BYTES:
        raise InvalidArgument(f"{field}: {len(cursor)} bytes, the limit is {limits.MAX_CURSOR_BYTES}")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        if not raw.startswith(_CURSOR_TAG):
            raise bad
        last = raw[len(_CURSOR_TAG):].decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise bad from None
    try:
        limits.check_id(last, field)
    except InvalidArgument:
        raise bad from None
    return last


class Reader:
    """GetImages and ListImages over every shard."""

    def __init__(self, shards: Sequence[ShardClient], config: BrokerConfig, routing: Routing | None = None) -> None:
        self.shards = shards
        self.config = config
        self.routing = routing or Routing(Placement(len(shards)))  # None: the bucket placement over shards, no reshard

    async def get(self, request: retrieval_pb2.GetImagesRequest, deadline: Deadline) -> retrieval_pb2.GetImagesResponse:
        """Stored records of ``request.ids`` in request order; unknown ids listed as missing."""
        if not 1 <= len(request.ids) <= limits.MAX_GET_IDS:
            raise InvalidArgument(f"ids: must hold 1..{limits.MAX_GET_IDS} ids, got {len(request.ids)}")
        ids = list(dict.fromkeys(request.ids))
        by_shard: dict[int, list[str]] = {}
        for i, image_id in enumerate(request.ids):
            limits.check_id(image_id, f"ids[{i}]")
        timeout = shard_timeout(deadline, self.config)
        with self.routing.reads.running():
            view = self.routing.view()
            for image_id in ids:
                by_shard.setdefault(view.owner(image_id), []).append(image_id)
            answers = await asyncio.gather(
                *(self.shards[sid].get_info(shard_pb2.GetInfoRequest(shard_id=sid, ids=sids, want_vector=request.with_vector), timeout)
                  for sid, sids in by_shard.items()),
                return_exceptions=True,
            )
        found: dict[str, retrieval_pb2.StoredImage] = {}
        missing: set[str] = set()
        unavailable: set[str] = set()
        for (sid, sids), ans in zip(by_shard.items(), answers):
            if isinstance(ans, BaseException):
                if isinstance(ans, InvalidArgument):
                    raise ans
                if not isinstance(ans, Exception):
                    raise ans
                unavailable.update(sids)
                continue
            missing.update(ans.missing)
            for img in ans.images:
                found[img.id] = retrieval_pb2.StoredImage(id=img.id, metadata=img.metadata, width=img.width, height=img.height,
                                                          shard_id=sid, vector=img.vector if img.HasField("vector") else None)
        if unavailable and len(unavailable) == len(ids):
            deadline.check()
            raise Unavailable(f"no shard holding the {len(ids)} ids answered")
        resp = retrieval_pb2.GetImagesResponse()
        for image_id in ids:
            if image_id in found:
                resp.images.append(found[image_id])
            elif image_id in missing:
                resp.missing.append(image_id)
            else:
                resp.unavailable.append(image_id)
        return resp

    async def list(self, request: retrieval_pb2.ListImagesRequest, deadline: Deadline) -> retrieval_pb2.ListImagesResponse:
        """One page of the collection in id order, after the request's cursor."""
        limits.check_int_range(request.page_size, "page_size", 0, limits.MAX_LIST_PAGE)
        page_size = request.page_size or limits.DEFAULT_LIST_PAGE
        after = decode_cursor(request.cursor)
        limits.check_filter(request.filter, "filter")
        timeout = shard_timeout(deadline, self.config)

        async def one(shard: ShardClient) -> shard_pb2.ListIdsResponse:
            req = shard_pb2.ListIdsRequest(shard_id=shard.shard_id, after=after, limit=page_size, filter=request.filter)
            return await shard.list_ids(req, timeout)

        with self.routing.reads.running():
            view = self.routing.view()
            shards = view.read_shards(self.shards)
            answers = await asyncio.gather(*(one(s) for s in shards))
        # a shard that stopped early has returned everything up to its scanned_to: cut there
        bounds = [a.scanned_to for a in answers if not a.done]
        bound = min(bounds) if bounds else None
        # during a reshard a shard may also hold copies of records it does not own: counted once, from the owner
        merged = sorted(
            ((img.id, sid, img) for sid, a in enumerate(answers) for img in a.images
             if (bound is None or img.id <= bound) and view.counts(shards[sid].shard_id, img.id)),
            key=lambda t: t[0],
        )
        page = merged[:page_size]
        resp = retrieval_pb2.ListImagesResponse()
        for image_id, sid, img in page:
            resp.images.add(id=image_id, metadata=img.metadata, width=img.width, height=img.height, shard_id=shards[sid].shard_id)
        if len(merged) > page_size:
            resp.next_cursor = encode_cursor(page[-1][0])
        elif bound is not None:
            resp.next_cursor = encode_cursor(bound)
        return resp
