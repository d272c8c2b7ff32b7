"""Everything one queen owns, built once by the app factory and reached through `app.state`."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from rbee.queen.events import EventBus
from rbee.queen.hives import HiveRegistry
from rbee.queen.registry import WorkerRegistry
from rbee.queen.settings import QueenSettings


@dataclass
class QueenState:
    settings: QueenSettings
    registry: WorkerRegistry
    hives: HiveRegistry
    bus: EventBus = field(default_factory=EventBus)


def get_state(request: Request) -> QueenState:
    state: QueenState = request.app.state.queen
    return state
