"""Prometheus's HTTP service-discovery format, as the queen answers `/v1/metrics/targets`."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ScrapeTarget(BaseModel):
    """One group of `host:port` targets sharing labels (`job`, `hive`, `model`, ...)."""

    targets: list[str]
    labels: dict[str, str] = Field(default_factory=dict)
