"""TCP options that make a dead peer visible within seconds, for any client or server socket.

A machine that drops off the network (cable pulled, power cut) sends no FIN and no RST: without
help, a kept-alive connection to it looks healthy until a read timeout, and an answer that is
merely slow (a long prompt on a busy CPU) needs that read timeout to be long. Keepalive probes
and `TCP_USER_TIMEOUT` are answered by the peer's kernel, not by its busy process, so they tell
"gone" from "slow": a peer that acknowledges nothing for `DEAD_PEER_S` is declared dead (the
read or write fails with ETIMEDOUT), while a live one may take as long as it likes.

The options are plain `(level, option, value)` triples, as httpx's
`AsyncHTTPTransport(socket_options=...)` takes them; `apply` sets them on any socket, and
`socket_factory` makes sockets with them for aiohttp's `TCPConnector(socket_factory=...)`.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohappyeyeballs import AddrInfoType

# How long a peer may acknowledge nothing (data or keepalive probes) before it counts as dead.
DEAD_PEER_S = 10
# An idle connection is probed after this long, then every KEEPALIVE_INTERVAL_S.
KEEPALIVE_IDLE_S = 4
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_PROBES = 3

SocketOption = tuple[int, int, int]

# How long an aiohttp client keeps an idle connection for reuse: less than uvicorn's 5 s, after
# which our servers close it. A request written into a connection the server is just closing
# would fail for no fault of the server.
CLIENT_KEEPALIVE_S = 4.0


def dead_peer_options(dead_after_s: float = DEAD_PEER_S) -> list[SocketOption]:
    """Keepalive (probing idle connections) plus a bound on unacknowledged data, where the
    platform has them; TCP_NODELAY too, since every rbee connection carries small messages."""
    options: list[SocketOption] = [
        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    ]
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),  # Linux, recent macOS
        ("TCP_KEEPALIVE", KEEPALIVE_IDLE_S),  # macOS's older name for the same
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
    ):
        option = getattr(socket, name, None)
        if option is not None and not (name == "TCP_KEEPALIVE" and hasattr(socket, "TCP_KEEPIDLE")):
            options.append((socket.IPPROTO_TCP, option, value))
    # Linux only: also ends a connection whose sent data stays unacknowledged this long, and caps
    # the keepalive verdict at the same bound.
    user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)
    if user_timeout is not None and sys.platform.startswith("linux"):
        options.append((socket.IPPROTO_TCP, user_timeout, int(dead_after_s * 1000)))
    return options


def apply(sock: socket.socket, options: list[SocketOption] | None = None) -> None:
    """Set the options on one socket (a listening socket passes them to the ones it accepts)."""
    for level, option, value in dead_peer_options() if options is None else options:
        sock.setsockopt(level, option, value)


def socket_factory(options: Iterable[SocketOption]) -> Callable[[AddrInfoType], socket.socket]:
    """Makes each outgoing socket of an aiohttp connector with these options set."""
    chosen = list(options)

    def make(addr: AddrInfoType) -> socket.socket:
        family, type_, proto, _, _ = addr
        sock = socket.socket(family, type_, proto)
        apply(sock, chosen)
        return sock

    return make
