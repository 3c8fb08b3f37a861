"""Rules for image ids, shared by the broker (public API) and the shards."""

from __future__ import annotations

from services.common.limits import MAX_ID_BYTES, check_id

__all__ = ["MAX_ID_BYTES", "check_id"]
