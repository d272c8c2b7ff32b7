"""rbee-hive's one settings object: flags, `RBEE_HIVE_*` environment, and `RBEE_TOKEN`."""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import CliImplicitFlag, SettingsConfigDict

from rbee.common.settings import DaemonSettings, HttpUrl, MiB, Seconds
from rbee.common.sizes import ByteSize
from rbee.common.tokens import is_loopback
from rbee.contracts.workers import http_url

HIVE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]", ""})
CACHE_DIR = Path("~/.cache/rbee")


def _default_worker_command() -> str:
    # The console script installed next to the running interpreter, else whatever PATH finds.
    candidate = Path(sys.executable).parent / "llm-worker-rbee"
    return str(candidate) if candidate.exists() else "llm-worker-rbee"


def _default_hive_id() -> str:
    # A host name is a valid hive id once anything outside the id alphabet is replaced.
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("-.") or "hive"
    return name[:128]


class HiveSettings(DaemonSettings):
    model_config = SettingsConfigDict(
        env_prefix="RBEE_HIVE_", cli_kebab_case=True, cli_prog_name="rbee-hive"
    )

    queen_url: HttpUrl = Field(description="where the queen listens, e.g. http://127.0.0.1:7833")
    host: str = Field("127.0.0.1", description="address to listen on (workers bind to it too)")
    port: int = Field(7835, ge=1, le=65535, description="port to listen on")
    hive_id: str = Field(
        default_factory=_default_hive_id, description="this hive's id (default: the host name)"
    )
    advertise_host: str | None = Field(
        None, description="how the queen reaches this hive and its workers (default: --host)"
    )
    models_dir: Path = Field(CACHE_DIR / "models", description="where model files live")
    log_dir: Path = Field(CACHE_DIR / "logs", description="where worker output is written")
    worker_ports: str = Field("8080-8999", description="ports workers may use, FIRST-LAST")
    heartbeat_interval: Seconds = Field(
        30.0, description="seconds between heartbeats (the hive's and its workers')"
    )
    spawn_timeout: Seconds = Field(
        300.0, description="longest a new worker may take to load its model"
    )
    stop_grace: Seconds = Field(10.0, description="seconds between SIGTERM and SIGKILL")
    worker_command: str = Field(
        default_factory=_default_worker_command,
        description="the worker executable",
    )
    max_body_bytes: int = Field(MiB, ge=1024, description="largest request body accepted")
    memory_limit: ByteSize | None = Field(
        None,
        description="most memory this hive's workers may take on each device (RAM for cpu:0, "
        "VRAM for each GPU), e.g. 512MiB or 8GiB (default: all that is free)",
    )

    standby: CliImplicitFlag[bool] = Field(
        True,
        description="keep a warm standby worker, its imports done, so that a new worker starts "
        "about a second sooner (--no-standby: keep none)",
    )

    @field_validator("hive_id")
    @classmethod
    def _hive_id(cls, value: str) -> str:
        if not HIVE_ID_PATTERN.match(value):
            raise ValueError("use letters, digits, '.', '_' and '-' (at most 128)")
        return value

    @field_validator("worker_ports")
    @classmethod
    def _worker_ports(cls, value: str) -> str:
        first, sep, last = value.partition("-")
        try:
            low, high = int(first), int(last if sep else first)
        except ValueError:
            raise ValueError("expected FIRST-LAST, e.g. 8080-8999") from None
        if not 1 <= low <= high <= 65535:
            raise ValueError("expected 1 <= FIRST <= LAST <= 65535")
        return f"{low}-{high}"

    @field_validator("models_dir", "log_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def port_range(self) -> range:
        low, _, high = self.worker_ports.partition("-")
        return range(int(low), int(high) + 1)

    @property
    def public_host(self) -> str:
        """The host name others use to reach this machine's hive and workers."""
        if self.advertise_host:
            return self.advertise_host
        return socket.gethostname() if self.host in WILDCARD_HOSTS else self.host

    @property
    def url(self) -> str:
        return http_url(self.scheme, self.public_host, self.port)

    @property
    def local_host(self) -> str:
        """Where this hive itself reaches the workers it starts."""
        if self.host in WILDCARD_HOSTS or is_loopback(self.host):
            return "127.0.0.1"
        return self.host
