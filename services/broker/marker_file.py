"""A small JSON record of an operation in progress (a restore, a reshard) in the broker's data
directory, written durably, so that a restarted broker knows what was under way."""

from __future__ import annotations

import json
import os
from typing import Any

from services.common.errors import DataLoss


class MarkerFile:
    """``directory/name`` holding one JSON object, or nothing; kept in memory without a directory.

    ``what`` names the operation in the DATA_LOSS message of an unreadable file."""

    def __init__(self, directory: str, name: str, what: str) -> None:
        self.path = os.path.join(directory, name) if directory else ""
        self.what = what
        self._memory: dict[str, Any] | None = None

    def get(self) -> dict[str, Any] | None:
        """The recorded object, or None when none is recorded. Raises DataLoss when unreadable."""
        if not self.path:
            return self._memory
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise DataLoss(f"{self.path}: unreadable {self.what} marker ({exc})") from None

    def set(self, marker: dict[str, Any] | None) -> None:
        """Record ``marker`` (None: remove the record): fsynced, then renamed into place."""
        if not self.path:
            self._memory = marker
            return
        if marker is None:
            if os.path.exists(self.path):
                os.remove(self.path)
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(marker, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
