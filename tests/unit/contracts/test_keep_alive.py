"""Keep-alive values as Ollama takes them: durations, seconds, 0 and negative."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from rbee.contracts.hive_api import SpawnRequest
from rbee.contracts.jobs import WorkerSpawnJob
from rbee.contracts.workers import parse_keep_alive


@pytest.mark.parametrize(
    ("given", "seconds"),
    [
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("2s", 2.0),
        ("500ms", 0.5),
        (" 30m ", 1800.0),
        ("300", 300.0),
        (300, 300.0),
        (2.5, 2.5),
        (0, 0.0),
        ("0", 0.0),
        (-1, math.inf),
        ("-1", math.inf),
        ("-5m", math.inf),
    ],
)
def test_keep_alive_values_read_as_ollama_reads_them(given: object, seconds: float) -> None:
    assert parse_keep_alive(given) == seconds


@pytest.mark.parametrize("given", ["banana", "", "10 minutes", "1x", "nan", True, None, [1]])
def test_anything_else_is_refused_naming_it(given: object) -> None:
    with pytest.raises(ValueError, match=r"keep-alive|duration"):
        parse_keep_alive(given)


def test_a_spawn_job_takes_a_duration_and_is_pinned_without_one() -> None:
    job = {"operation": "worker_spawn", "model": "m"}
    assert WorkerSpawnJob.model_validate(job).keep_alive is None
    assert WorkerSpawnJob.model_validate({**job, "keep_alive": "10m"}).keep_alive == 600.0
    assert WorkerSpawnJob.model_validate({**job, "keep_alive": -1}).keep_alive is None
    with pytest.raises(ValidationError, match="banana"):
        WorkerSpawnJob.model_validate({**job, "keep_alive": "banana"})
    assert SpawnRequest(model="m", keep_alive_s=5).keep_alive_s == 5.0
