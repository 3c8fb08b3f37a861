"""Sizing of answers under the message limit (services/common/message_size.py): the worst-case
sizes bound real protobuf encodings at the limits, groups and refusals follow the budget."""

from __future__ import annotations

import numpy as np
import pytest

from loupe.tensors import to_tensor
from loupe.v1 import retrieval_pb2, shard_pb2
from services.broker.batch import check_batch_fits
from services.common import limits, message_size
from services.common.errors import InvalidArgument
from services.common.message_size import MessageBudget
from services.index.store import ShardStore, StoredImage


def _worst_metadata() -> dict[str, str]:
    """64 entries whose keys and values fill exactly 4 KiB, the most framing the limits allow."""
    keys = [f"k{i:03d}" + "x" * 60 for i in range(limits.MAX_METADATA_ENTRIES)]
    rest = limits.MAX_METADATA_BYTES - sum(len(k) for k in keys)
    values = [""] * len(keys)
    values[0] = "v" * rest
    return dict(zip(keys, values))


def test_varints_and_fields():
    assert [message_size.varint_bytes(n) for n in (0, 127, 128, 16383, 16384)] == [1, 1, 2, 2, 3]
    assert message_size.field_bytes(4096) == 1 + 2 + 4096


def test_worst_case_sizes_bound_real_encodings():
    md = _worst_metadata()
    limits.check_metadata(md, "metadata")  # legal
    assert shard_pb2.Metadata(values=md).ByteSize() <= message_size.METADATA_BYTES
    image_id = "i" * limits.MAX_ID_BYTES
    one = shard_pb2.ShardSearchResponse(ids=[image_id], scores=[0.5])
    one.metadata.add().values.update(md)
    base = shard_pb2.ShardSearchResponse(scores=[]).ByteSize()
    assert one.ByteSize() - base <= message_size.shard_hit_bytes()
    result = retrieval_pb2.SearchResponse()
    r = result.results.add(id=image_id, score=-1.0, verified=True, confidence=1.0, shard_id=2**31 - 1, metadata=md)
    r.stages.CopyFrom(retrieval_pb2.StageScores(diffusion=-1.0, inliers=2**31 - 1, **{"global": -1.0}))
    assert result.ByteSize() <= message_size.result_bytes()
    n = limits.MAX_LOCAL_FEATURES_PER_IMAGE
    r.matches.query_points.CopyFrom(to_tensor(np.zeros((n, 2), np.float32)))
    r.matches.result_points.CopyFrom(to_tensor(np.zeros((n, 2), np.float32)))
    assert result.ByteSize() <= message_size.result_bytes(with_matches=True)
    info = shard_pb2.GetInfoResponse()
    info.images.add(id=image_id, metadata=md, width=2**31 - 1, height=2**31 - 1, vector=to_tensor(np.zeros(1280, np.float32)))
    assert info.ByteSize() <= message_size.info_bytes(1280)


def test_split_keeps_order_and_each_group_within_the_budget():
    budget = MessageBudget(3 * limits.MiB)  # 2 MiB for items
    costs = [limits.MiB // 2] * 7 + [5 * limits.MiB, 1]
    groups = budget.split(costs)
    assert [i for g in groups for i in g] == list(range(len(costs)))
    assert groups == [[0, 1, 2, 3], [4, 5, 6], [7], [8]]  # the oversized item alone: its shard refuses it
    assert all(sum(costs[i] for i in g) <= budget.bytes for g in groups if len(g) > 1)


def test_check_names_the_field_and_how_many_fit():
    budget = MessageBudget()
    budget.check(1000, message_size.shard_hit_bytes(), "top_k", "hits")
    with pytest.raises(InvalidArgument, match=r"^top_k: 20000 hits of up to \d+ bytes each exceed the 64 MiB message limit: at most \d+ per call"):
        budget.check(20_000, message_size.shard_hit_bytes(), "top_k", "hits")
    assert budget.items(10**12) == 1


def test_a_batch_is_refused_when_k_times_the_worst_result_exceeds_the_limit():
    def batch(n: int, k: int, matches: bool = False) -> retrieval_pb2.SearchBatchRequest:
        return retrieval_pb2.SearchBatchRequest(queries=[retrieval_pb2.SearchRequest(k=k, return_matches=matches)] * n)

    budget = MessageBudget()
    at_most = budget.bytes // (1000 * message_size.result_bytes())
    check_batch_fits(batch(at_most, 1000), budget, 1000)
    with pytest.raises(InvalidArgument, match=rf"^queries: 64 queries .* at most {at_most} queries of k=1000 per SearchBatch$"):
        check_batch_fits(batch(64, 1000), budget, 1000)
    check_batch_fits(batch(64, 100), budget, 1000)
    with pytest.raises(InvalidArgument, match="and the matches"):
        check_batch_fits(batch(64, 100, matches=True), budget, 1000)
    check_batch_fits(batch(64, 10**6), budget, 1000)  # k out of range fails its query alone, counts 0


def test_the_store_counts_records_above_the_limits_and_recounts_a_store_that_predates_the_count(tmp_path):
    v = np.ones(8, np.float32) / np.sqrt(8)
    store = ShardStore(str(tmp_path))
    store.put([StoredImage("ok", v, None, None, {"a": "b"}), StoredImage("big", v, None, None, {"a": "x" * 5000}),
               StoredImage("regions", v, np.zeros((limits.MAX_REGIONS_PER_IMAGE + 1, 8), np.float16), None)])
    assert store.oversized() == 2
    store.delete(["big"])
    assert store.oversized() == 1
    store.put([StoredImage("regions", v, None, None)])  # replaced within the limits
    assert store.oversized() == 0
    store.put([StoredImage("big2", v, None, None, {"a": "x" * 5000})])
    # a store written before the counter existed: no marker, no counter → counted at open
    store.put_setting("oversized_scanned", None)
    with store.env.begin(write=True) as txn:
        txn.put(b"oversized", (0).to_bytes(8, "big"), db=store.dbs["settings"])
    store.close()
    again = ShardStore(str(tmp_path))
    assert again.oversized() == 1
    again.close()


def test_verified_candidate_bound_holds_at_the_local_feature_limit():
    n = limits.MAX_LOCAL_FEATURES_PER_IMAGE
    big = 2**31 - 1  # the widest varint an int32 index takes (5 bytes)
    msg = shard_pb2.VerifiedCandidate(id="x" * limits.MAX_ID_BYTES, inliers=n, model=[1e300] * 9,
                                      query_index=[big] * n, candidate_index=[big] * n,
                                      candidate_points=to_tensor(np.full((n, 2), 1e6, np.float32)))
    resp = shard_pb2.ShardVerifyResponse()
    resp.results.append(msg)
    assert resp.ByteSize() <= message_size.verified_candidate_bytes()
