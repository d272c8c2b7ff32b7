"""Picking a port for a new worker: the first one in the hive's range that nobody holds."""

from __future__ import annotations

import socket
from collections.abc import Iterable


def is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Same option the worker's server sets, so a port in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError:
            return False
    return True


def pick_port(host: str, candidates: Iterable[int], taken: set[int]) -> int | None:
    """The first candidate not in `taken` that can be bound on `host`, or None."""
    for port in candidates:
        if port not in taken and is_free(host, port):
            return port
    return None
