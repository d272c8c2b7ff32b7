"""A worker's command line, read back: how the hive and the CLI recognise worker processes.

The hive keeps no record of the workers it starts and `rbee up` stops the workers of its
queen; both find them by asking the operating system for command lines and reading the
flags the hive wrote there."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

WORKER_EXECUTABLE = "llm-worker-rbee"
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


def worker_command_flags(cmdline: Sequence[str]) -> dict[str, str] | None:
    """The flags of a worker's command line (its script, or `python -m rbee.worker.main`),
    or None for any other process."""
    if not any(
        Path(arg).name == WORKER_EXECUTABLE or arg.startswith("rbee.worker") for arg in cmdline[:3]
    ):
        return None
    return parse_flags(cmdline[1:])
