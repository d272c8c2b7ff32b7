"""Where `rbee` keeps track of the daemons it started: `~/.cache/rbee/run` (or $RBEE_STATE_DIR),
one JSON pid file and one log file per daemon, and the clusters that `rbee up` runs."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from rbee.cli.processes import Started

STATE_DIR_ENV = "RBEE_STATE_DIR"


def state_dir() -> Path:
    configured = os.environ.get(STATE_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "rbee" / "run"


def pid_path(name: str) -> Path:
    return state_dir() / f"{name}.json"


def log_path(name: str) -> Path:
    return state_dir() / f"{name}.log"


def save(path: Path, started: Started, **extra: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "name": started.name,
        "pid": started.pid,
        "create_time": started.create_time,
        "url": started.url,
        "log": str(started.log),
        **extra,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def load(path: Path) -> tuple[Started, dict[str, object]] | None:
    """The recorded process and its extra fields; None when there is no readable record."""
    try:
        record = json.loads(path.read_text())
        started = Started(
            name=str(record["name"]),
            pid=int(record["pid"]),
            create_time=float(record["create_time"]),
            url=str(record["url"]),
            log=Path(record["log"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return started, record


def load_running(path: Path) -> tuple[Started, dict[str, object]] | None:
    """The recorded process if it still runs; a stale record is removed."""
    found = load(path)
    if found is None:
        return None
    if not found[0].alive():
        path.unlink(missing_ok=True)
        return None
    return found


# -- clusters started by `rbee up` ----------------------------------------------------------------
# Each `rbee up` is a cluster with a name (`--name`; "default" for the one on the default port):
# its record `up.json` (`up-NAME.json` for another name), its daemons' logs `up-queen.log` and
# `up-hive-ID.log` (`up-NAME-queen.log`…), and its token in `up[-NAME].token` (mode 0600), so
# that every other command finds its URL and token without flags.

DEFAULT_CLUSTER = "default"
CLUSTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def cluster_prefix(name: str) -> str:
    """`up` for the default cluster, `up-NAME` for another: the start of its files' names."""
    return "up" if name == DEFAULT_CLUSTER else f"up-{name}"


def token_path(record: str) -> Path:
    return state_dir() / f"{record}.token"


def save_token(record: str, token: str | None) -> None:
    """The token a daemon or cluster runs with, readable by this user only; none: no file."""
    path = token_path(record)
    if not token:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".token-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token)
    tmp.replace(path)


def stale_clusters() -> list[str]:
    """Names of the clusters whose `rbee up` died without stopping what it started."""
    directory = state_dir()
    names = []
    for path in sorted(directory.glob("up*.json")) if directory.is_dir() else []:
        found = load(path)
        if found is not None and found[0].name == "rbee up" and not found[0].alive():
            names.append(str(found[1].get("cluster") or DEFAULT_CLUSTER))
    return names


def read_token(record: str) -> str | None:
    try:
        return token_path(record).read_text().strip() or None
    except OSError:
        return None


@dataclass(frozen=True)
class RunningCluster:
    """A cluster on this machine that `rbee` commands can talk to without flags."""

    name: str
    url: str
    pid: int
    record: str  # the state file's stem: up, up-NAME, queen-rbee

    @property
    def token(self) -> str | None:
        return read_token(self.record)


def running_clusters() -> list[RunningCluster]:
    """Every `rbee up` still running (by name), and a queen of `rbee queen start` (named
    "queen")."""
    found = []
    directory = state_dir()
    for path in sorted(directory.glob("up*.json")) if directory.is_dir() else []:
        # Not load_running: the record of an `rbee up` that was killed stays, for the next
        # `rbee up` (or `rbee down`) to stop what it left behind.
        running = load(path)
        if running is None or running[0].name != "rbee up" or not running[0].alive():
            continue
        name = str(running[1].get("cluster") or DEFAULT_CLUSTER)
        found.append(RunningCluster(name, running[0].url, running[0].pid, path.stem))
    queen = load_running(pid_path("queen-rbee"))
    if queen is not None:
        found.append(RunningCluster("queen", queen[0].url, queen[0].pid, "queen-rbee"))
    return found


@dataclass(frozen=True)
class Target:
    """Which queen a command talks to, with which token; `problem` when it cannot tell."""

    url: str
    token: str | None
    cluster: str | None = None
    problem: str | None = None


def _same_url(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def choose(
    *,
    url: str | None,
    token: str | None,
    cluster: str | None,
    default_url: str,
    running: list[RunningCluster],
) -> Target:
    """The queen a command talks to: the URL given (--queen-url, RBEE_QUEEN_URL), else the
    cluster named (--cluster, RBEE_CLUSTER), else the only cluster running here (the default
    one when several run), else the default URL. A token given (RBEE_TOKEN, --token-file) wins;
    else the chosen cluster's own."""
    if url is not None:
        same = next((c for c in running if _same_url(c.url, url)), None)
        return Target(url, token or (same.token if same else None), same.name if same else None)
    names = ", ".join(c.name for c in running)
    if cluster is not None:
        picked = next((c for c in running if c.name == cluster), None)
        if picked is None:
            running_now = f"running here: {names}" if running else "none runs here"
            return Target(
                default_url,
                token,
                cluster,
                problem=f"no cluster named {cluster!r} is running ({running_now}) — start it "
                f"with `rbee up --name {cluster}`",
            )
    elif len(running) == 1:
        picked = running[0]
    elif running:
        picked = next((c for c in running if c.name == DEFAULT_CLUSTER), None)
        if picked is None:
            return Target(
                default_url,
                token,
                problem=f"several clusters are running here ({names}) — choose one with "
                "--cluster NAME (or RBEE_CLUSTER)",
            )
    else:
        return Target(default_url, token)
    return Target(picked.url, token or picked.token, picked.name)
