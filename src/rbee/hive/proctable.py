"""One look at every process on the machine: command lines and parents, read once for all who ask.

A hive finds its workers and RPC servers by their command lines, and counts the memory of the
processes under them (a worker's `llama-server`). Reading all of /proc is most of a heartbeat;
reading it again for each worker's children, and again for the RPC servers, took a heartbeat
from ~9 ms to ~25 ms on two cores, at the moments a model loads or answers its first request.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import psutil


@dataclass(frozen=True)
class ProcessTable:
    processes: list[psutil.Process]  # each with `.info["cmdline"]`
    _children: dict[int, list[psutil.Process]] = field(default_factory=dict)

    @classmethod
    def read(cls) -> ProcessTable:
        """Blocks: reads /proc."""
        processes = list(psutil.process_iter(["cmdline", "ppid"]))
        children: dict[int, list[psutil.Process]] = {}
        for proc in processes:
            children.setdefault(proc.info.get("ppid") or 0, []).append(proc)
        return cls(processes, children)

    def descendants(self, pid: int) -> list[psutil.Process]:
        """The processes under `pid` (its children, theirs, and so on), as of the look."""
        found: list[psutil.Process] = []
        seen, stack = {pid}, [pid]
        while stack:
            for child in self._children.get(stack.pop(), ()):
                if child.pid not in seen:
                    seen.add(child.pid)
                    found.append(child)
                    stack.append(child.pid)
        return found


def resident(procs: list[psutil.Process]) -> int:
    """Their resident memory together (those gone since the look count nothing)."""
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += proc.memory_info().rss
    return total
