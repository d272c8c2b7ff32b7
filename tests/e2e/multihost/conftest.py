"""A queen and two hives on three machines of a test LAN (network namespaces on a bridge)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rbee_testing import netns
from rbee_testing.lan_cluster import LanCluster

# Short heartbeat interval and timeout, so the faults play out in seconds, not minutes.
QUEEN_FLAGS = (
    "--heartbeat-timeout", "5",
    "--cleanup-interval", "1",
    "--cooldown", "5",
    "--queue-size", "32",
    "--queue-timeout", "120",
    "--hive-forget-after", "15",
    # Faults are the subject here: requests spread over both machines as least-loaded does
    # (prefix routing keeps a run of like requests on one worker).
    "--routing-policy", "least-loaded",
)  # fmt: skip


def three_machines(tmp_path: Path, *queen_flags: str) -> Iterator[LanCluster]:
    """Queen on `queen`, hives on `box1` and `box2`; no workers yet. Everything it made is gone
    when the test ends, pass or fail."""
    with netns.Lan(["queen", "box1", "box2"]) as lan:
        cluster = LanCluster(lan, tmp_path)
        cluster.start_queen(*queen_flags)
        cluster.start_hive("box1")
        cluster.start_hive("box2")
        yield cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LanCluster]:
    yield from three_machines(tmp_path, *QUEEN_FLAGS)


@pytest.fixture
def default_timeouts_cluster(tmp_path: Path) -> Iterator[LanCluster]:
    """The queen's own heartbeat timeout (90 s) and cooldown: a machine that drops off stays
    listed online for a minute and a half, so only its dead connections can give it away."""
    yield from three_machines(
        tmp_path, "--queue-size", "32", "--queue-timeout", "120", "--routing-policy", "least-loaded"
    )
