"""CPU sets written the way Linux writes them (`0-3,6`): parsed, printed, and the ones usable here."""

from __future__ import annotations

import os
import re

_PART = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_cpu_set(text: str) -> tuple[int, ...]:
    """`0-3,6` → (0, 1, 2, 3, 6). ValueError for anything else, or an empty set."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        match = _PART.match(part)
        if match is None:
            raise ValueError(f"{text!r} is not a CPU list like 0-3,6")
        low = int(match[1])
        high = int(match[2]) if match[2] is not None else low
        if high < low:
            raise ValueError(f"{part!r}: the range runs backwards")
        cpus.update(range(low, high + 1))
    return tuple(sorted(cpus))


def format_cpu_set(cpus: tuple[int, ...] | list[int] | set[int]) -> str:
    """(0, 1, 2, 3, 6) → `0-3,6`."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def usable_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on (its affinity), or all of them where that is unknown."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))
