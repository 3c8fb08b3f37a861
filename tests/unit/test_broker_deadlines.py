"""Per-shard budgets: a fraction of the caller's deadline, capped per query carried."""

from __future__ import annotations

import pytest

from services.broker.config import BrokerConfig
from services.broker.deadlines import Deadline, shard_timeout


def test_budget_is_capped_per_query_and_by_the_deadline_fraction() -> None:
    cfg = BrokerConfig(shard_budget_s=2.0, shard_budget_fraction=0.5)
    long = Deadline(60.0, 30.0)
    assert shard_timeout(long, cfg) == pytest.approx(2.0, abs=0.01)
    assert shard_timeout(long, cfg, queries=8) == pytest.approx(16.0, abs=0.01)  # a batch of 8 may take 2 s each
    assert shard_timeout(long, cfg, queries=64) == pytest.approx(30.0, abs=0.05)  # never beyond half the deadline
    assert shard_timeout(Deadline(1.0, 30.0), cfg, queries=8) == pytest.approx(0.5, abs=0.01)


def test_batch_error_messages_name_the_query() -> None:
    from services.broker.batch import _prefixed
    from services.common.errors import InvalidArgument, Unavailable

    assert str(_prefixed(InvalidArgument("k: must be in 1..1000, got 0"), 3)) == "queries[3].k: must be in 1..1000, got 0"
    assert str(_prefixed(Unavailable("no shard answered the search"), 0)) == "queries[0]: no shard answered the search"
