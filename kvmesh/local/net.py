"""Free loopback ports for the local processes (the one helper every local tool and test uses)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (asked one at a time, so the kernel may repeat one: retry)."""
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return list(ports)
