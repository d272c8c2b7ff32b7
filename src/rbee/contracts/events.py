"""What the queen remembers of its models' comings and goings (`GET /v1/model-events`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class ModelEvent(BaseModel):
    """A worker of a model loaded or unloaded. `reason`: for a load, why it was started
    (`on_demand`, `replica`, `manual`, ...); for an unload, `idle`, `evicted` or `manual`."""

    model_config = ConfigDict(extra="allow")

    at: str  # ISO 8601, UTC
    change: Literal["loaded", "unloaded"]
    model: str
    worker_id: str
    hive_id: str | None = None
    reason: str


class ModelEvents(BaseModel):
    events: list[ModelEvent]  # oldest first
