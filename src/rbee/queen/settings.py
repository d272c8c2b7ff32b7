"""queen-rbee's one settings object: flags, `RBEE_QUEEN_*` environment, and `RBEE_TOKEN`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import CliImplicitFlag, SettingsConfigDict

from rbee.common.settings import DaemonSettings, Seconds
from rbee.contracts.hives import HiveView
from rbee.contracts.workers import parse_keep_alive
from rbee.queen.scheduler.split import split_across_default

DATA_DIR = Path("~/.local/share/rbee/queen")
DEFAULT_PORT = 7833


# Seconds, from a duration ("5m") or a number; math.inf for a negative one (never unload).
KeepAlive = Annotated[float, BeforeValidator(parse_keep_alive)]


def default_data_dir(port: int) -> Path:
    """One per port, so two queens (two clusters) of one user never share API keys; the
    default port keeps the path it always had."""
    name = DATA_DIR.name if port == DEFAULT_PORT else f"{DATA_DIR.name}-{port}"
    return (DATA_DIR.parent / name).expanduser()


class QueenSettings(DaemonSettings):
    model_config = SettingsConfigDict(
        env_prefix="RBEE_QUEEN_", cli_kebab_case=True, cli_prog_name="queen-rbee"
    )

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(DEFAULT_PORT, ge=1, le=65535, description="port to listen on")
    heartbeat_timeout: Seconds = Field(
        90.0, description="a worker or hive not heard from for this long is offline"
    )
    cleanup_interval: Seconds = Field(30.0, description="how often offline workers are removed")
    hive_forget_after: Seconds = Field(
        600.0, description="a hive not heard from for this long is forgotten (not just offline)"
    )
    summary_interval: Seconds = Field(
        5.0, description="how often the heartbeat stream sends a summary event"
    )
    stats_interval: Seconds = Field(
        2.0, description="how often the heartbeat stream sends live figures while it is watched"
    )
    history_interval: Seconds = Field(
        10.0, description="how often the dashboard's charts get a sample (the last hour is kept)"
    )
    data_dir: Path = Field(
        DATA_DIR,
        description="where the queen keeps its database (API keys); a queen on another port "
        "than 7833 defaults to queen-PORT beside this, so each cluster has its own keys",
    )
    routing_policy: Literal["prefix", "least-loaded", "round-robin"] = Field(
        "prefix",
        description="how a worker is chosen among the available ones: prefix sends a "
        "conversation's turns where its prompt is already cached (least-loaded when none is, "
        "or when that worker is overloaded)",
    )
    prefix_load_margin: Annotated[float, Field(ge=0)] = Field(
        0.5,
        description="the prefix policy passes over the worker that holds a request's prefix "
        "when its load (busy share of its slots) exceeds the least loaded worker's by more "
        "than this (0: only an equally loaded worker keeps its prefixes)",
    )
    queue_size: int = Field(
        32, ge=0, description="requests that may wait per model when all are busy"
    )
    queue_timeout: Seconds = Field(30.0, description="longest a request waits for a free worker")
    spawn_timeout: Seconds = Field(
        300.0,
        description="the base of a worker's load deadline: longest to wait for a hive to start "
        "a worker and for it to be ready, plus --load-timeout-per-gib for each GiB of its model",
    )
    load_timeout_per_gib: Annotated[float, Field(ge=0)] = Field(
        60.0,
        description="seconds added to a worker's load deadline (--spawn-timeout) for each GiB "
        "of memory its model needs, so big models are never cut off by a short fixed timeout",
    )
    swap_max_wait: Seconds = Field(
        30.0,
        description="longest a model that fits nowhere waits for busy workers of other models "
        "to go idle; then they are evicted once their requests in flight end (no thrash: "
        "before that, a loaded model serves its queued requests first)",
    )
    retries: int = Field(2, ge=0, description="other workers tried after a worker fails")
    cooldown: Seconds = Field(10.0, description="how long a failed worker sits out")
    keep_alive: KeepAlive = Field(
        300.0,
        description="how long a worker the queen started on demand stays loaded once idle "
        "(a duration such as 5m or 1h, or seconds; 0: unload as soon as idle; -1: never)",
    )
    model_keep_alive: dict[str, KeepAlive] = Field(
        default_factory=dict,
        description="the keep-alive of one model's on-demand workers, as MODEL=DURATION "
        '(repeatable; the cluster file\'s [models."ID"] keep_alive)',
    )

    replica_after: Seconds = Field(
        2.0,
        description="when a model's workers are all busy and a request has waited this long, "
        "another worker of it starts where there is room",
    )
    max_replicas: int | None = Field(
        None, ge=1, description="most workers of one model (default: as many as fit)"
    )
    min_replicas: int = Field(
        0, ge=0, description="workers of one model that are never unloaded for idleness"
    )
    model_max_replicas: dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict,
        description="most workers of one model, as MODEL=N (repeatable; the cluster file's "
        '[models."ID"] max_replicas)',
    )
    model_min_replicas: dict[str, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict,
        description="workers of one model never unloaded for idleness, as MODEL=N "
        '(repeatable; the cluster file\'s [models."ID"] min_replicas)',
    )

    ctx_size: int | None = Field(
        None,
        ge=16,
        le=1 << 20,
        description="tokens of context per slot of the workers it starts on demand (default: "
        "each model's trained context, up to 8192 on a CPU and 32768 on a GPU, as far as the "
        "device's memory allows)",
    )
    slots: int | None = Field(
        None,
        ge=1,
        le=64,
        description="requests each worker it starts on demand serves at once (default: 2 "
        "where memory allows, else 1)",
    )
    model_ctx_size: dict[str, Annotated[int, Field(ge=16, le=1 << 20)]] = Field(
        default_factory=dict,
        description="the context of one model's on-demand workers, as MODEL=TOKENS "
        '(repeatable; the cluster file\'s [models."ID"] ctx_size)',
    )
    model_slots: dict[str, Annotated[int, Field(ge=1, le=64)]] = Field(
        default_factory=dict,
        description="the slots of one model's on-demand workers, as MODEL=N (repeatable; the "
        'cluster file\'s [models."ID"] slots)',
    )

    split_across_hives: CliImplicitFlag[bool] = Field(
        False,
        description="split a model that fits on no single hive over the devices of several "
        "(llama.cpp's RPC backend, behind tunnels that admit only the cluster token); default: "
        "on when every hive talks over TLS or loopback, else off (--no-split-across-hives: "
        "never)",
    )

    def split_across(self, hives: Sequence[HiveView]) -> bool:
        """Whether a model may be split across hives: as set, else the cluster's default."""
        if "split_across_hives" in self.model_fields_set:
            return self.split_across_hives
        return split_across_default(hives)

    def sizing_of(self, model: str) -> tuple[int | None, int | None]:
        """(ctx_size, slots) of the model's workers started on demand; None: its default."""
        return self.model_ctx_size.get(model, self.ctx_size), self.model_slots.get(
            model, self.slots
        )

    def max_replicas_of(self, model: str) -> int | None:
        return self.model_max_replicas.get(model, self.max_replicas)

    def min_replicas_of(self, model: str) -> int:
        return self.model_min_replicas.get(model, self.min_replicas)

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _data_dir_of_port(self) -> Self:
        if "data_dir" not in self.model_fields_set:
            self.data_dir = default_data_dir(self.port)
        return self
