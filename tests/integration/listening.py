"""Which TCP ports processes listen on, and on which interface, read from /proc (Linux only)."""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Listener:
    """One listening TCP socket."""

    ip: str
    port: int
    pid: int
    command: str

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.ip).is_loopback


def _parse(path: str, family: int) -> dict[int, tuple[str, int]]:
    """inode → (ip, port) of sockets in state LISTEN (0A) in /proc/net/tcp or tcp6."""
    out: dict[int, tuple[str, int]] = {}
    try:
        with open(path) as f:
            lines = f.readlines()[1:]
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if parts[3] != "0A":
            continue
        hex_ip, hex_port = parts[1].split(":")
        raw = bytes.fromhex(hex_ip)
        if family == socket.AF_INET:
            ip = socket.inet_ntop(family, raw[::-1])
        else:  # four little-endian 32-bit words
            ip = socket.inet_ntop(family, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
            mapped = ipaddress.IPv6Address(ip).ipv4_mapped
            ip = str(mapped) if mapped else ip
        out[int(parts[9])] = (ip, int(hex_port, 16))
    return out


def listeners(pids: set[int] | None = None) -> list[Listener]:
    """Listening TCP sockets of ``pids`` (all readable processes when None)."""
    inodes = {**_parse("/proc/net/tcp", socket.AF_INET), **_parse("/proc/net/tcp6", socket.AF_INET6)}
    found: list[Listener] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or (pids is not None and int(entry) not in pids):
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        seen = set()
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in inodes and inode not in seen:
                    seen.add(inode)
                    ip, port = inodes[inode]
                    found.append(Listener(ip, port, int(entry), command))
    return found


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it (by walking /proc/*/stat parents)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                parent[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
            except (OSError, ValueError):
                continue
    out, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        for child, par in parent.items():
            if par == p and child not in out:
                out.add(child)
                frontier.append(child)
    return out
