"""Rules for image ids, shared by the broker (public API) and the shards."""

from __future__ import annotations

from services.common.errors import InvalidArgument

MAX_ID_BYTES = 512


def check_id(image_id: str, field: str) -> None:
    """Raise InvalidArgument unless ``image_id`` is a 1..512-byte string."""
    if not image_id:
        raise InvalidArgument(f"{field}: image id must not be empty")
    if len(image_id.encode("utf-8")) > MAX_ID_BYTES:
        raise InvalidArgument(f"{field}: image id longer than {MAX_ID_BYTES} bytes")
