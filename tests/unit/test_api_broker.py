"""Pure pieces of the public API (issue 13): list cursors, the client's filter specs, limits,
and the ListImages page cut over fake shards (a shard that stopped early bounds the page)."""

from __future__ import annotations

import asyncio

import pytest

from loupe.client import parse_filter
from loupe.v1 import retrieval_pb2, shard_pb2, types_pb2
from services.broker.config import BrokerConfig
from services.broker.deadlines import Deadline
from services.broker.reads import Reader, decode_cursor, encode_cursor
from services.common.errors import InvalidArgument
from services.common.limits import check_filter, parse_filter_number


@pytest.mark.parametrize("last", ["a", "coffee/orig", "é/ü/日本", "x" * 511])
def test_cursor_round_trip(last):
    c = encode_cursor(last)
    assert decode_cursor(c) == last and "=" not in c


@pytest.mark.parametrize("bad", ["garbage!", "bG91cGU", encode_cursor("a")[:-3] + "AAA", "A" * 3000])
def test_bad_cursor_is_invalid_argument(bad):
    with pytest.raises(InvalidArgument, match="cursor"):
        decode_cursor(bad)


def test_parse_filter_specs():
    f = parse_filter(["customer=acme", "colour=red|blue", "year>=2020", "year<2025", "taken>2020-01-01", "eq=a>b"])
    by_key = {c.key: c for c in f.all}
    assert by_key["customer"].equals == "acme"
    assert list(by_key["colour"].any_of.values) == ["red", "blue"]
    assert (by_key["year"].range.min, by_key["year"].range.max, by_key["year"].range.max_exclusive) == ("2020", "2025", True)
    assert by_key["taken"].range.min_exclusive and by_key["eq"].equals == "a>b"
    check_filter(f)
    with pytest.raises(ValueError, match="nokey"):
        parse_filter(["nokey"])


def test_numbers_and_dates():
    assert parse_filter_number(" 42 ") == 42.0
    assert parse_filter_number("1970-01-02") == 86400.0
    assert parse_filter_number("1970-01-01T01:00:00+01:00") == 0.0
    for bad in ("nan", "inf", "tomorrow", "2020-13-01"):
        with pytest.raises(ValueError):
            parse_filter_number(bad)


class ListShard:
    """Serves ListIds over a fixed sorted id list, examining at most ``scan`` ids per call."""

    def __init__(self, shard_id: int, ids: list[str], scan: int, keep=lambda i: True):
        self.shard_id, self.ids, self.scan, self.keep = shard_id, sorted(ids), scan, keep

    async def list_ids(self, req: shard_pb2.ListIdsRequest, timeout_s: float) -> shard_pb2.ListIdsResponse:
        after = [i for i in self.ids if i > req.after]
        examined = after[: self.scan]
        picked = [i for i in examined if self.keep(i)][: req.limit]
        done = len(examined) == len(after) and len(picked) == len([i for i in examined if self.keep(i)])
        last = picked[-1] if len(picked) == req.limit and not done else (examined[-1] if examined else req.after)
        resp = shard_pb2.ListIdsResponse(done=done, scanned_to="" if done else last)
        for i in picked:
            resp.images.add(id=i)
        return resp


def _scan(reader: Reader, page_size: int) -> tuple[list[str], int]:
    seen, cursor, pages = [], "", 0
    while True:
        page = asyncio.run(reader.list(retrieval_pb2.ListImagesRequest(page_size=page_size, cursor=cursor), Deadline(5, 5)))
        seen.extend(i.id for i in page.images)
        pages += 1
        if not page.next_cursor:
            return seen, pages
        cursor = page.next_cursor


def test_list_merges_shards_and_cuts_at_the_slowest_scan():
    a = [f"a{i:03d}" for i in range(0, 100, 2)]
    b = [f"a{i:03d}" for i in range(1, 100, 2)] + ["b"]
    rare = ListShard(1, b, scan=7, keep=lambda i: i.endswith("9") or i == "b")  # a selective filter: few matches per call
    seen, pages = _scan(Reader([ListShard(0, a, scan=1000), rare], BrokerConfig()), page_size=5)
    want = sorted(a + [i for i in b if i.endswith("9") or i == "b"])
    assert seen == want and pages > len(want) // 5


def test_filter_limits():
    too_many = types_pb2.Filter(all=[types_pb2.Condition(key="k", equals="v")] * 17)
    with pytest.raises(InvalidArgument, match=r"filter\.all:"):
        check_filter(too_many)
    values = types_pb2.Filter(all=[types_pb2.Condition(key="k", any_of=types_pb2.ValueSet(values=["v"] * 257))])
    with pytest.raises(InvalidArgument, match=r"any_of"):
        check_filter(values)


def test_shards_of_different_dimensions_fail_the_collection_build_naming_each():
    """A collection-wide build (graph, whitening) over shards that disagree on the dimension is
    FAILED_PRECONDITION listing every shard's (records written past the broker, issue 24's soak)."""
    from services.broker.graph_build import one_dimension
    from services.common.errors import FailedPrecondition

    assert one_dimension({0: 0, 1: 1280, 2: 1280}, "indexed") == 1280
    assert one_dimension({0: 0, 1: 0}, "indexed") == 0
    with pytest.raises(FailedPrecondition, match=r"shard 0: 2, shard 1: 1280"):
        one_dimension({1: 1280, 0: 2, 2: 0}, "indexed")


def test_whitening_pairs_are_checked_naming_the_field():
    from services.broker.admin import check_pairs
    from services.common.limits import MAX_WHITENING_PAIRS

    pair = retrieval_pb2.ImagePair
    check_pairs([pair(a="a", b="b"), pair(a="b", b="c")])
    with pytest.raises(InvalidArgument, match=r"^pairs\[1\]: a pair needs two different images"):
        check_pairs([pair(a="a", b="b"), pair(a="c", b="c")])
    with pytest.raises(InvalidArgument, match=r"^pairs\[0\]\.a"):
        check_pairs([pair(a="", b="b")])
    with pytest.raises(InvalidArgument, match=r"^pairs\[0\]\.b"):
        check_pairs([pair(a="a", b="x\x00y")])
    with pytest.raises(InvalidArgument, match=rf"^pairs: at most {MAX_WHITENING_PAIRS}"):
        check_pairs([pair(a="a", b="b")] * (MAX_WHITENING_PAIRS + 1))
