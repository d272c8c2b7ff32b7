"""A worker's command line, read back: how the hive and the CLI recognise worker processes.

The hive keeps no record of the workers it starts and `rbee up` stops the workers of its
queen; both find them by asking the operating system for command lines and reading the
flags the hive wrote there."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import psutil

WORKER_EXECUTABLE = "llm-worker-rbee"
HIVE_EXECUTABLE = "rbee-hive"
STANDBY_FLAG = "--standby"  # a hive's standby worker (rbee.hive.standby), and the forks it made
# The environment variable a hive marks its workers with (its id): with the command line, how
# a process is known as one of its workers.
SPAWN_MARKER = "RBEE_SPAWNED_BY_HIVE"


def parse_flags(args: Sequence[str]) -> dict[str, str]:
    """`--name value` and `--name=value` pairs of a command line."""
    flags: dict[str, str] = {}
    for index, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, eq, value = arg.partition("=")
        if eq:
            flags[name] = value
        elif index + 1 < len(args):
            flags[name] = args[index + 1]
    return flags


def runs(cmdline: Sequence[str], executable: str, package: str) -> bool:
    """The command line runs one of our programs: its script, or `python -m PACKAGE…`."""
    return any(Path(arg).name == executable or arg.startswith(package) for arg in cmdline[:3])


def worker_command_flags(cmdline: Sequence[str]) -> dict[str, str] | None:
    """The flags of a worker's command line (its script, or `python -m rbee.worker.main`),
    or None for any other process."""
    if not runs(cmdline, WORKER_EXECUTABLE, "rbee.worker"):
        return None
    return parse_flags(cmdline[1:])


def started_ticks(pid: int) -> str:
    """When the process started, exactly as the kernel counts it (Linux: clock ticks since
    boot; psutil's create_time adds a boot time that may be read a second off by another
    process, so a restarted hive would miss its files). Raises ProcessLookupError."""
    if sys.platform == "linux":
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            raise ProcessLookupError(pid) from None
        return stat.rsplit(")", 1)[1].split()[19]  # field 22, starttime
    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except psutil.Error:
        raise ProcessLookupError(pid) from None


def handed_flags_file(flags_dir: Path, pid: int) -> Path:
    """Where the flags of a worker forked by a hive's standby are kept: its command line is
    the standby's (`--standby --hive-id ID`), so the hive reads them here. Named after the
    process's pid and start time: a pid used again is another process. Raises
    ProcessLookupError for a process that has gone."""
    return flags_dir / f"{pid}-{started_ticks(pid)}.json"
