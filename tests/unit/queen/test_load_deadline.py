"""The load deadline grows with the model: a base plus seconds per GiB it needs."""

from __future__ import annotations

from rbee.queen.scheduler.spawner import load_deadline_s
from rbee.queen.settings import QueenSettings

GIB = 1 << 30


def test_the_deadline_is_the_base_plus_seconds_per_gib() -> None:
    assert load_deadline_s(300, 60, 0) == 300
    assert load_deadline_s(300, 60, GIB // 2) == 330
    # A 40 GiB model gets 43 minutes, not the 5 of a fixed timeout.
    assert load_deadline_s(300, 60, 40 * GIB) == 2700


def test_the_queen_settings_default_to_300_s_plus_60_s_per_gib() -> None:
    settings = QueenSettings()
    assert (settings.spawn_timeout, settings.load_timeout_per_gib) == (300.0, 60.0)
    custom = QueenSettings.model_validate({"spawn_timeout": 30, "load_timeout_per_gib": 120})
    assert load_deadline_s(custom.spawn_timeout, custom.load_timeout_per_gib, 2 * GIB) == 270
