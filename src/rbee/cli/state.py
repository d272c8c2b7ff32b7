"""Where `rbee` keeps track of the daemons it started: `~/.cache/rbee/run` (or $RBEE_STATE_DIR),
one JSON pid file and one log file per daemon."""

from __future__ import annotations

import json
import os
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
