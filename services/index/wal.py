"""Append-only write-ahead log of a shard: a write is acknowledged only after fsync.

Entry layout: kind (1 byte) | payload length (uint32 LE) | CRC32 of payload (uint32 LE) | payload.
A torn last entry (crash mid-append, never acknowledged) is dropped on replay; a bad CRC
before the tail means corruption and raises ``WalCorrupt``.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Iterator

_HEADER = struct.Struct("<BII")


class WalCorrupt(Exception):
    """The log has a damaged entry before its tail."""


class WriteAheadLog:
    """An fsync'd append-only log at ``path`` (created if missing)."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._valid_bytes = 0  # set by replay()
        self._file = None

    def replay(self) -> Iterator[tuple[int, bytes]]:
        """Yield (kind, payload) of every complete entry, then truncate a torn tail."""
        valid = 0
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                data = f.read()
            pos = 0
            while pos + _HEADER.size <= len(data):
                kind, length, crc = _HEADER.unpack_from(data, pos)
                end = pos + _HEADER.size + length
                if end > len(data):
                    break  # torn tail
                payload = data[pos + _HEADER.size : end]
                if zlib.crc32(payload) != crc:
                    if end == len(data):
                        break  # torn tail whose length field landed but payload did not
                    raise WalCorrupt(f"{self.path}: bad checksum at byte {pos}")
                yield kind, payload
                pos = end
                valid = pos
            if valid != len(data):
                with open(self.path, "r+b") as f:
                    f.truncate(valid)
        self._valid_bytes = valid

    def append(self, kind: int, payload: bytes) -> None:
        """Append one entry and fsync before returning."""
        if self._file is None:
            self._file = open(self.path, "ab")
        self._file.write(_HEADER.pack(kind, len(payload), zlib.crc32(payload)) + payload)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._valid_bytes += _HEADER.size + len(payload)

    @property
    def size_bytes(self) -> int:
        """Bytes of valid log."""
        return self._valid_bytes

    def close(self) -> None:
        """Close the file (entries are already durable)."""
        if self._file is not None:
            self._file.close()
            self._file = None
