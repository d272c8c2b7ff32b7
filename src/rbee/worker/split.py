"""A worker split over several machines: its `llama-server` reaches the RPC servers that helper
hives lend it through the near ends of rbee's authenticated tunnels (`rbee.common.tunnel`).

`--rpc-tunnel rbee[+tls]://HOST:PORT/NAME` (one per helper hive, in `--tensor-split` order)
becomes a loopback port of this worker each, and `llama-server --rpc 127.0.0.1:P1,127.0.0.1:P2`
connects there; the tunnels close with the worker. When a helper drops off, llama.cpp aborts
the server (a failed RPC call is fatal to it), and the worker's watch on its engine ends it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from rbee.common.tls import client_context
from rbee.common.tunnel import TunnelClient
from rbee.contracts.rpc import TUNNEL_SCHEMES
from rbee.worker.engines.llama_process import LlamaServer, ServerConfig

log = logging.getLogger("rbee.worker.split")


@dataclass(frozen=True)
class TunnelEndpoint:
    host: str
    port: int
    name: str
    tls: bool


def parse_endpoint(endpoint: str) -> TunnelEndpoint:
    """`rbee://HOST:PORT/NAME` or `rbee+tls://…`, as a hive's RPC server reports it."""
    parts = urlsplit(endpoint)
    name = parts.path.lstrip("/")
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in TUNNEL_SCHEMES or not parts.hostname or port is None or not name:
        raise ValueError(
            f"{endpoint!r} is not an RPC tunnel endpoint (rbee://HOST:PORT/NAME or rbee+tls://…)"
        )
    return TunnelEndpoint(parts.hostname, port, name, parts.scheme == "rbee+tls")


def rpc_args(local_ports: Sequence[int], tensor_split: Sequence[float]) -> list[str]:
    """llama-server's flags for the RPC servers behind the tunnels' near ends."""
    args = ["--rpc", ",".join(f"127.0.0.1:{port}" for port in local_ports)]
    if tensor_split:
        args += ["--tensor-split", ",".join(f"{share:g}" for share in tensor_split)]
    return args


class SplitLlamaServer(LlamaServer):
    """A `LlamaServer` whose model is partly on other machines' devices."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        tunnels: Sequence[str],
        tensor_split: Sequence[float],
        token: str,
        load_timeout_s: float = 300.0,
        stall_timeout_s: float = 180.0,
    ) -> None:
        super().__init__(config, load_timeout_s=load_timeout_s, stall_timeout_s=stall_timeout_s)
        self.endpoints = [parse_endpoint(e) for e in tunnels]
        self.tensor_split = list(tensor_split)
        self.token = token
        self.tunnels: list[TunnelClient] = []
        self.tunnel_failures: list[str] = []

    def launch(self) -> None:
        # Its flags name its tunnels: it starts once they are up (`start`), not before.
        if self.tunnels:
            super().launch()

    async def start(self) -> None:
        ports = []
        for endpoint in self.endpoints:
            tunnel = TunnelClient(
                endpoint.host,
                endpoint.port,
                endpoint.name,
                self.token,
                tls=client_context() if endpoint.tls else None,
                on_failure=self.tunnel_failures.append,
            )
            ports.append(await tunnel.start())
            self.tunnels.append(tunnel)
        extra = rpc_args(ports, self.tensor_split)
        log.info("llama-server reaches %d RPC server(s) through rbee's tunnels", len(ports))
        self.config = replace(self.config, extra_args=(*self.config.extra_args, *extra))
        await super().start()

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            for tunnel in self.tunnels:
                await tunnel.close()
