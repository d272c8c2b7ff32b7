"""The cluster file (`~/.config/rbee/cluster.toml`): the queen's settings, the hives, and the
workers to keep. Read with `tomllib`, checked with pydantic; every error names the line, the key
and what is wrong.

    [queen]
    port = 7833                       # host defaults to 0.0.0.0 when a hive is over SSH
    # routing_policy = "prefix"       # or least-loaded, round-robin
    # swap_max_wait = 30              # seconds a model waits for busy ones to make room
    # split_across_hives = true       # split a model no hive fits over several (default: only
    #                                 # when every hive talks over TLS or loopback)
    # url = "http://10.0.0.5:7833"    # how hives reach it (default: the address each hive's
    #                                 # SSH connection comes from; loopback for local hives)

    [[hive]]
    ssh = "me@box2"                   # omit for a hive on this machine
    hive_id = "box2"                  # default: the HOST part (this machine: its host name)
    # memory_limit = "8GiB"           # most its workers may take on each device
    # advertise_host, remote_command, port, worker_ports, models_dir

    [[worker]]
    model = "smollm2-135m-instruct"
    count = 2                         # spread over the hives unless `hive` names one
    # ctx_size = 8192                 # tokens of context per slot (default: the model's own,
    # slots = 4                       # as memory allows) and requests served at once

    [models."qwen2.5-coder-7b"]       # a model the queen starts on demand...
    keep_alive = "30m"                # ...stays this long once idle ([queen] keep_alive: all)
    max_replicas = 3                  # workers it gets at most while requests wait for it
    min_replicas = 1                  # workers it keeps however long they idle
    ctx_size = 8192                   # tokens of context per slot of its workers
    slots = 4                         # requests each of them serves at once
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from rbee.cli.ssh import SshTarget
from rbee.common.sizes import ByteSize
from rbee.contracts.workers import parse_keep_alive

CONFIG_ENV = "RBEE_CONFIG"
HIVE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
HOSTNAME_PATTERN = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def default_path() -> Path:
    configured = os.environ.get(CONFIG_ENV)
    return Path(configured) if configured else Path.home() / ".config" / "rbee" / "cluster.toml"


def _address(value: str) -> str:
    """A host name or an IP address (IPv6 with or without brackets)."""
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        pass
    if not HOSTNAME_PATTERN.match(value):
        raise ValueError(f"{value!r} is not a host name or an IP address")
    return value


def _hive_id(value: str) -> str:
    if not HIVE_ID_PATTERN.match(value):
        raise ValueError(f"{value!r}: use letters, digits, '.', '_' and '-' (at most 128)")
    return value


def _port_range(value: str) -> str:
    first, sep, last = value.partition("-")
    try:
        low, high = int(first), int(last if sep else first)
    except ValueError:
        raise ValueError(f"{value!r} is not FIRST-LAST, e.g. 8080-8999") from None
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"{value!r}: expected 1 <= FIRST <= LAST <= 65535")
    return f"{low}-{high}"


def _http_url(value: str) -> str:
    if not re.match(r"^https?://[^/\s:]+|^https?://\[[0-9A-Fa-f:.]+\]", value):
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    return value.rstrip("/")


Address = Annotated[str, AfterValidator(_address)]
HiveId = Annotated[str, AfterValidator(_hive_id)]
Port = Annotated[int, Field(ge=1, le=65535)]
PositiveSeconds = Annotated[float, Field(gt=0)]


def _keep_alive(value: str | int | float) -> str:
    parse_keep_alive(value)  # checked here, so a bad one is an error naming its line
    return str(value)


# A keep-alive as written ("30m", 600, -1), passed on to queen-rbee as it is.
KeepAliveText = Annotated[str | int | float, AfterValidator(_keep_alive)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QueenSection(Strict):
    host: Address | None = None
    port: Port = 7833
    url: Annotated[str, AfterValidator(_http_url)] | None = None
    heartbeat_timeout: PositiveSeconds | None = None
    routing_policy: Literal["prefix", "least-loaded", "round-robin"] | None = None
    prefix_load_margin: Annotated[float, Field(ge=0)] | None = None
    queue_size: Annotated[int, Field(ge=0)] | None = None
    queue_timeout: PositiveSeconds | None = None
    spawn_timeout: PositiveSeconds | None = None
    retries: Annotated[int, Field(ge=0)] | None = None
    cooldown: PositiveSeconds | None = None
    keep_alive: KeepAliveText | None = None
    swap_max_wait: PositiveSeconds | None = None
    replica_after: PositiveSeconds | None = None
    max_replicas: Annotated[int, Field(ge=1)] | None = None
    min_replicas: Annotated[int, Field(ge=0)] | None = None
    split_across_hives: bool | None = None

    def flags(self) -> list[str]:
        """The queen-rbee flags for the settings given here (host and port are set apart)."""
        args: list[str] = []
        for name in ("heartbeat_timeout", "routing_policy", "queue_size", "queue_timeout"):
            args += _flag(name, getattr(self, name))
        for name in ("spawn_timeout", "retries", "cooldown", "keep_alive", "swap_max_wait"):
            args += _flag(name, getattr(self, name))
        for name in ("replica_after", "max_replicas", "min_replicas"):
            args += _flag(name, getattr(self, name))
        args += _flag("prefix_load_margin", self.prefix_load_margin)
        if self.split_across_hives is not None:  # a switch: --split-across-hives or --no-…
            args.append(f"--{'' if self.split_across_hives else 'no-'}split-across-hives")
        return args


def _flag(name: str, value: object) -> list[str]:
    return [] if value is None else [f"--{name.replace('_', '-')}", str(value)]


class HiveSection(Strict):
    ssh: str | None = None
    hive_id: HiveId | None = None
    advertise_host: Address | None = None
    remote_command: Annotated[str, Field(min_length=1)] | None = None
    host: Address | None = None
    port: Port = 7835
    worker_ports: Annotated[str, AfterValidator(_port_range)] | None = None
    models_dir: Annotated[str, Field(min_length=1)] | None = None
    heartbeat_interval: PositiveSeconds | None = None
    memory_limit: ByteSize | None = None

    @field_validator("ssh")
    @classmethod
    def _ssh(cls, value: str | None) -> str | None:
        if value is not None:
            SshTarget.parse(value)
        return value


CtxSize = Annotated[int, Field(ge=16, le=1 << 20)]
Slots = Annotated[int, Field(ge=1, le=64)]


class WorkerSection(Strict):
    model: Annotated[str, Field(min_length=1)]
    count: Annotated[int, Field(ge=1, le=64)] = 1
    hive: HiveId | None = None
    device: Annotated[str, Field(min_length=1)] | None = None
    ctx_size: CtxSize | None = None
    slots: Slots | None = None


class ModelSection(Strict):
    """`[models."ID"]`: how the queen treats one model it starts on demand."""

    keep_alive: KeepAliveText | None = None
    max_replicas: Annotated[int, Field(ge=1)] | None = None
    min_replicas: Annotated[int, Field(ge=0)] | None = None
    ctx_size: CtxSize | None = None
    slots: Slots | None = None


class ClusterFile(Strict):
    queen: QueenSection = QueenSection()
    hive: Annotated[list[HiveSection], Field(min_length=1)]
    worker: list[WorkerSection] = Field(default_factory=list)
    models: dict[str, ModelSection] = Field(default_factory=dict)

    def model_flags(self) -> list[str]:
        """The queen-rbee flags for the `[models."ID"]` tables."""
        args: list[str] = []
        for model, section in self.models.items():
            if section.keep_alive is not None:
                args += ["--model-keep-alive", model_value(model, section.keep_alive)]
            if section.max_replicas is not None:
                args += ["--model-max-replicas", model_value(model, section.max_replicas)]
            if section.min_replicas is not None:
                args += ["--model-min-replicas", model_value(model, section.min_replicas)]
            if section.ctx_size is not None:
                args += ["--model-ctx-size", model_value(model, section.ctx_size)]
            if section.slots is not None:
                args += ["--model-slots", model_value(model, section.slots)]
        return args


def model_value(model: str, value: str | float) -> str:
    """One model's value for a `--model-…` flag of the queen: `MODEL=VALUE`, or a JSON object
    for an id that form cannot carry (the queen's flags read `a,b=1` as two pairs, and `a=b=1`
    as `a` with the value `b=1`)."""
    if any(c in model for c in ",={"):
        return json.dumps({model: value})
    return f"{model}={value}"


class ClusterFileError(ValueError):
    """One line: `PATH line N: KEY: what is wrong`."""


def load(path: Path, *, local_hive_id: str) -> ClusterFile:
    """Read and check the file; hives without `hive_id` get their default one."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ClusterFileError(f"{path}: {exc.strerror or exc}") from None
    return parse(text, path=str(path), local_hive_id=local_hive_id)


def parse(text: str, *, path: str, local_hive_id: str) -> ClusterFile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message ends with "(at line N, column M)"
        raise ClusterFileError(f"{path}: not valid TOML: {exc}") from None
    try:
        cluster = ClusterFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = f"unknown key (allowed: {', '.join(_allowed(loc))})"
        elif loc == ("hive",):
            message = "the file needs at least one [[hive]] table"
        elif first["type"] == "missing":
            message = "missing"
        raise ClusterFileError(_where(path, text, loc) + message) from None
    return _with_ids(cluster, text, path, local_hive_id)


SECTIONS: dict[str, type[BaseModel]] = {
    "queen": QueenSection,
    "hive": HiveSection,
    "worker": WorkerSection,
    "models": ModelSection,
}


def _allowed(loc: tuple[int | str, ...]) -> list[str]:
    model = SECTIONS.get(str(loc[0]), ClusterFile) if len(loc) > 1 else ClusterFile
    return list(model.model_fields)


def _with_ids(cluster: ClusterFile, text: str, path: str, local_hive_id: str) -> ClusterFile:
    hives = []
    seen: dict[str, int] = {}
    for index, hive in enumerate(cluster.hive):
        hive_id = hive.hive_id
        if hive_id is None:
            hive_id = _default_id(SshTarget.parse(hive.ssh).host) if hive.ssh else local_hive_id
            hive = hive.model_copy(update={"hive_id": hive_id})
        if hive_id in seen:
            where = _where(path, text, ("hive", index, "hive_id"))
            raise ClusterFileError(
                f"{where}duplicate hive id {hive_id!r} (hive {seen[hive_id] + 1} has it too; "
                "set hive_id to tell them apart)"
            )
        seen[hive_id] = index
        hives.append(hive)
    for index, worker in enumerate(cluster.worker):
        if worker.hive is not None and worker.hive not in seen:
            where = _where(path, text, ("worker", index, "hive"))
            raise ClusterFileError(
                f"{where}no hive {worker.hive!r} in this file (hives: {', '.join(seen)})"
            )
    return cluster.model_copy(update={"hive": hives})


def _default_id(host: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", host).strip("-.")[:128] or "hive"


def _where(path: str, text: str, loc: tuple[int | str, ...]) -> str:
    """`PATH line N: hive[2].ssh: ` for a pydantic location like ('hive', 1, 'ssh')."""
    key = ""
    for part in loc:
        key += f"[{part + 1}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    line = find_line(text, loc)
    return f"{path}{f' line {line}' if line else ''}: {key}: "


def find_line(text: str, loc: tuple[int | str, ...]) -> int | None:
    """The line of the key at `loc` (else the line of its table), for files written the usual
    way: `[queen]`, `[[hive]]` headers and `key = value` lines."""
    if not loc:
        return None
    table, rest = str(loc[0]), loc[1:]
    index = 0
    if rest and isinstance(rest[0], int):
        index, rest = rest[0], rest[1:]
    key = str(rest[0]) if rest else None
    current: str | None = None
    seen: dict[str, int] = {}
    header_line = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line.startswith("["):
            current = line.strip("[]").strip()
            seen[current] = seen.get(current, -1) + 1
            if current == table and seen[current] == index:
                header_line = number
            continue
        if "=" not in line:
            continue
        name = line.split("=", 1)[0].strip().strip("\"'")
        if current is None and key is None and name == table:
            return number  # a key at the top of the file
        if current == table and seen[current] == index and name == key:
            return number
    return header_line
