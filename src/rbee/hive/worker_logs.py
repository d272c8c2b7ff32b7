"""Workers' log files on their hive: one per worker id, earlier ones kept, read from the end.

A worker's output goes to `LOG_DIR/worker-ID.log`. A worker id started again keeps its earlier
worker's log as `.1` (up to `LOG_KEEP` of them). A start-up failure quotes the end of the log;
`rbee worker logs` reads its last lines.
"""

from __future__ import annotations

import os
from pathlib import Path

OUTPUT_TAIL_BYTES = 4000  # what a start-up failure quotes of the worker's output
LOG_KEEP = 5  # earlier logs kept of a worker id started again (worker-ID.log.1 … .5)
LOG_TAIL_MAX_BYTES = 4 * 1024 * 1024  # `rbee worker logs` reads at most this much of the end


def rotate_log(path: Path, keep: int = LOG_KEEP) -> None:
    """`worker-ID.log` becomes `.1`, `.1` becomes `.2`… up to `keep` old logs; the oldest goes."""
    if not path.exists():
        return
    for n in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{n + 1}"))
    path.replace(path.with_name(f"{path.name}.1"))


def read_end(path: Path, limit: int) -> str:
    """At most the last `limit` bytes of the file, as text. Raises OSError."""
    with path.open("rb") as log:
        log.seek(max(0, log.seek(0, os.SEEK_END) - limit))
        return log.read().decode(errors="replace")


def output_tail(path: Path, limit: int = OUTPUT_TAIL_BYTES) -> str:
    """The end of a worker's output, for an error message; empty if there is none."""
    try:
        return read_end(path, limit).strip()
    except OSError:
        return ""


def last_lines(path: Path, lines: int) -> str:
    """The last `lines` lines of a log. Raises FileNotFoundError (no such log), OSError."""
    return "".join(read_end(path, LOG_TAIL_MAX_BYTES).splitlines(keepends=True)[-lines:])
