"""Which cores a new worker runs on: a pure decision over the cores the running workers hold.

llama.cpp's threads wait for each other by spinning, so two workers on the same cores starve
each other, and passive waiting — safe when cores are shared — costs a worker alone most of its
speed. So each worker gets cores of its own, with as many threads as cores, and spins on them.
Only when there are not enough free cores does a worker share, and then it waits passively.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CorePlacement:
    cpus: tuple[int, ...]
    shared: bool  # some of these cores are another worker's too: wait passively


def default_share(machine: int, running: int) -> int:
    """An even share of the machine among the workers on it once this one runs (at least 1)."""
    return max(1, machine // (running + 1))


def place_cores(
    machine: Sequence[int], held: Sequence[Sequence[int]], wanted: int | None = None
) -> CorePlacement:
    """`machine`: the cores workers may use; `held`: the cores of each running worker;
    `wanted`: how many (None: `default_share`, taken only from the free cores).

    Free cores are taken first, lowest first. A worker that asked for more cores than are free
    gets the free ones plus the least-used others, and is marked shared; so is a default worker
    on a machine with no free core left, which gets its share of the least-used ones.
    """
    if not machine:
        raise ValueError("a machine has at least one core")
    count = min(wanted or default_share(len(machine), len(held)), len(machine))
    use = Counter(cpu for cpus in held for cpu in cpus if cpu in machine)
    free = [cpu for cpu in sorted(machine) if use[cpu] == 0]
    if wanted is None and free:
        count = min(count, len(free))
    chosen = free[:count]
    if len(chosen) < count:
        busy = sorted((cpu for cpu in machine if use[cpu] > 0), key=lambda cpu: (use[cpu], cpu))
        chosen += busy[: count - len(chosen)]
    return CorePlacement(tuple(sorted(chosen)), shared=any(use[cpu] for cpu in chosen))
