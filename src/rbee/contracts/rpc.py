"""RPC servers: a hive lending its devices to a worker split over several machines.

The queen asks a helper hive (`POST /v1/rpc-servers`) to start an RPC server (llama.cpp's
`ggml-rpc-server`) for a worker; the hive answers with the endpoint of the authenticated tunnel
in front of it (`rbee.common.tunnel`), which the worker is given with `--rpc-tunnel`. The RPC
server itself listens on the hive's loopback only.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from rbee.contracts.workers import DeviceId, NonEmptyStr, Port

TUNNEL_SCHEMES = ("rbee", "rbee+tls")


class RpcServerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    worker_id: NonEmptyStr = Field(description="the split worker it lends its devices to")
    devices: Annotated[list[DeviceId], Field(min_length=1)] = Field(
        default_factory=lambda: ["cpu:0"],
        description="the devices it exposes: cpu:0, or one or more cuda:N",
    )
    bytes: Annotated[int, Field(ge=0)] = Field(
        0, description="the memory the queen's plan gives it (what it will hold)"
    )
    allow_peer: NonEmptyStr | None = Field(
        None,
        description="the one address that may connect to its tunnel: the main worker's host "
        "(unset: any peer that proves the cluster token)",
    )
    threads: Annotated[int, Field(ge=1, le=4096)] | None = Field(
        None, description="CPU threads of the RPC server (default: every core of the hive)"
    )
    cache: bool = Field(
        False, description="keep the tensors it receives in a local file cache (`-c`)"
    )
    connect_timeout_s: Annotated[float, Field(gt=0)] | None = Field(
        None,
        description="how long it waits for the worker's first connection before it stops "
        "(default: the hive's --spawn-timeout)",
    )


class RpcServerInfo(BaseModel):
    """An RPC server of a hive, found by asking the operating system."""

    rpc_id: str = Field(description="its name, also the tunnel's (the handshake names it)")
    worker_id: str
    pid: int = Field(description="the process of its tunnel, whose child the RPC server is")
    host: str = Field(description="where the tunnel listens, as the queen reaches the hive")
    port: Port
    tls: bool = False
    devices: list[str]
    bytes: int = 0
    uptime_s: float = 0.0
    memory_bytes: int = Field(0, description="resident memory, the RPC server's included")

    @property
    def endpoint(self) -> str:
        """What a worker's `--rpc-tunnel` takes: `rbee[+tls]://HOST:PORT/NAME`."""
        scheme = "rbee+tls" if self.tls else "rbee"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{self.rpc_id}"


class RpcServerList(BaseModel):
    rpc_servers: list[RpcServerInfo]


class RpcServerStopped(BaseModel):
    pid: int
    rpc_id: str
    signal: Literal["SIGTERM", "SIGKILL"]
