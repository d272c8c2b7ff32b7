"""Placement: a pure choice of hive for a new worker, over snapshots the hives reported."""

from __future__ import annotations

from collections.abc import Sequence

from rbee.contracts.hives import HiveView


def free_memory(hive: HiveView, device: str | None = None) -> int:
    devices = [d for d in hive.devices if device is None or d.id == device]
    return max((d.memory_free_bytes for d in devices), default=0)


def hives_with_model(hives: Sequence[HiveView], model: str) -> list[HiveView]:
    return [h for h in hives if h.online and model in h.models]


def choose_hive(
    hives: Sequence[HiveView], model: str, device: str | None = None
) -> HiveView | None:
    """The online hive that has the model in its catalog and the most free memory."""
    fitting = [
        h
        for h in hives_with_model(hives, model)
        if device is None or any(d.id == device for d in h.devices)
    ]
    if not fitting:
        return None
    return max(fitting, key=lambda h: (free_memory(h, device), h.id))
