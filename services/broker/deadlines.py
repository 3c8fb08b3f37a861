"""Time budgets of one call: the caller's deadline, and each shard call's share of it."""

from __future__ import annotations

import time

from services.broker.config import BrokerConfig
from services.common.errors import DeadlineExceeded


class Deadline:
    """The caller's deadline as an absolute monotonic time."""

    def __init__(self, timeout_s: float | None, default_s: float) -> None:
        self.expires = time.monotonic() + (timeout_s if timeout_s is not None else default_s)

    def remaining(self) -> float:
        """Seconds left; raises DeadlineExceeded when none."""
        left = self.expires - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("deadline exceeded before the request finished")
        return left

    def check(self) -> None:
        """Raise DeadlineExceeded when the caller's deadline has passed: a backend that ran out of
        its share is the caller's DEADLINE_EXCEEDED only then, else it is UNAVAILABLE."""
        self.remaining()


class PerCallBudget:
    """No caller deadline on an open-ended stream: each backend call gets ``budget_s``."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s

    def remaining(self) -> float:
        return self.budget_s

    def check(self) -> None:
        """No caller deadline: never passed."""


def shard_timeout(deadline: Deadline | PerCallBudget, config: BrokerConfig, queries: int = 1) -> float:
    """Budget of one shard call: a fraction of the caller's remaining time, so that a hung
    shard is reported missing (partial answer) while the caller still waits. A call carrying
    ``queries`` searches (SearchBatch) may take ``shard_budget_s`` per query, still within the
    fraction of the caller's deadline."""
    left = deadline.remaining()
    budget = left * config.shard_budget_fraction
    if config.shard_budget_s > 0:
        budget = min(budget, config.shard_budget_s * max(1, queries))
    return max(budget, min(left, 0.05))
