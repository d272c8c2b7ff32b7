"""One look at every process on the machine, shared by all who ask within one heartbeat.

A hive finds its workers and RPC servers by their command lines, and counts the memory of the
processes under them (a worker's `llama-server`). Reading every command line is most of a
heartbeat's cost (~5 ms for ~70 processes); the workers and the RPC servers each read them
all, and a worker's children were looked up twice (for its memory, then for its pids). Now one
look serves them all, and each worker's children are looked up once (psutil's own parent map,
~2 ms).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import psutil


@dataclass(frozen=True)
class ProcessTable:
    processes: list[psutil.Process]  # each with `.info["cmdline"]`
    _under: dict[int, list[psutil.Process]] = field(default_factory=dict)

    @classmethod
    def read(cls) -> ProcessTable:
        """Blocks: reads /proc."""
        return cls(list(psutil.process_iter(["cmdline"])))

    def descendants(self, pid: int) -> list[psutil.Process]:
        """The processes under `pid` (its children, theirs, and so on): looked up once per
        table, so a second ask within the same heartbeat costs nothing."""
        if pid not in self._under:
            try:
                found = psutil.Process(pid).children(recursive=True)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                found = []
            self._under[pid] = found
        return self._under[pid]


def resident(procs: list[psutil.Process]) -> int:
    """Their resident memory together (those gone since the look count nothing)."""
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += proc.memory_info().rss
    return total
