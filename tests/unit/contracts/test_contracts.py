"""The wire contract: what is accepted, what is refused and how it looks on the wire."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from rbee.contracts.errors import read_error
from rbee.contracts.workers import WorkerHeartbeat, WorkerInfo, WorkerStatus

VALID: dict[str, Any] = {
    "id": "w1",
    "model_id": "m",
    "port": 8080,
    "status": "ready",
    "version": "0.1.0",
}


def test_defaults_fill_the_fields_the_seed_left_open() -> None:
    info = WorkerInfo.model_validate(VALID)
    assert (info.host, info.hive_id, info.slots, info.in_flight) == ("127.0.0.1", None, 1, 0)
    assert info.device == "cpu:0"
    assert info.implementation == "llm-worker-rbee"
    assert info.status is WorkerStatus.READY
    assert info.url == "http://127.0.0.1:8080"


def test_statuses_travel_as_lower_case_strings() -> None:
    assert [s.value for s in WorkerStatus] == ["starting", "ready", "busy", "stopping", "stopped"]
    assert WorkerInfo.model_validate(VALID).model_dump(mode="json")["status"] == "ready"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", ""),
        ("port", 0),
        ("port", 65536),
        ("status", "sleeping"),
        ("slots", 0),
        ("in_flight", -1),
        ("host", "evil.example:80"),
    ],
)
def test_invalid_values_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as caught:
        WorkerInfo.model_validate({**VALID, field: value})
    assert [err["loc"][0] for err in caught.value.errors()] == [field]


def test_ipv6_hosts_are_bracketed_in_urls() -> None:
    assert WorkerInfo.model_validate({**VALID, "host": "::1"}).url == "http://[::1]:8080"


def test_heartbeat_timestamp_is_rfc3339_utc_whatever_zone_it_came_in() -> None:
    local = datetime(2026, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    beat = WorkerHeartbeat(worker=WorkerInfo.model_validate(VALID), timestamp=local)
    assert json.loads(beat.model_dump_json())["timestamp"] == "2026-01-02T03:04:05Z"


def test_heartbeat_without_a_zone_is_refused() -> None:
    with pytest.raises(ValidationError):
        WorkerHeartbeat.model_validate({"worker": VALID, "timestamp": "2026-01-02T03:04:05"})


def test_heartbeat_gets_the_current_time_by_default() -> None:
    beat = WorkerHeartbeat(worker=WorkerInfo.model_validate(VALID))
    assert abs(beat.timestamp - datetime.now(UTC)) < timedelta(seconds=5)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"error": {"message": "no such model", "code": "model_not_found"}}',
            ("no such model", "model_not_found"),
        ),
        (b'{"detail": "Not Found"}', ("Not Found", None)),
        (b"Internal Server Error", ("Internal Server Error", None)),
        (b"", ("HTTP 502", None)),
    ],
)
def test_error_bodies_are_read_whatever_their_shape(
    body: bytes, expected: tuple[str, str | None]
) -> None:
    assert read_error(502, body) == expected


@pytest.mark.parametrize(
    "url", ["0", "http://a b:1", "http://x:99999", "ftp://x:1", "http://x:1/path", "http://u@x:1"]
)
def test_a_hive_url_is_a_plain_base_url(url: str) -> None:
    """Found by fuzzing: the queen builds requests and Prometheus targets from it."""
    from rbee.contracts.hives import HiveInfo

    with pytest.raises(ValidationError, match="url"):
        HiveInfo(id="h", url=url, version="1")
    assert HiveInfo(id="h", url="https://[::1]:7835/", version="1").url == "https://[::1]:7835"
