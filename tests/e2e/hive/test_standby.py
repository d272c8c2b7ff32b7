"""The real `rbee-hive` and its standby: a worker it forks is a worker like any other (listed,
logged, heartbeating, answering a real chat), the standby stays for the next one, a restarted
hive finds the worker, and no standby outlives its hive."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from rbee.common.bundled import DEFAULT_MODEL
from rbee.hive.standby import standby_flags

from .conftest import Daemon, HiveProc, HiveStarter, wait_for

pytestmark = pytest.mark.e2e


def standbys(hive_id: str) -> list[int]:
    """Pids of the processes whose command line is a standby of this hive (idle or handed)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if standby_flags(proc.info.get("cmdline") or [], hive_id):
            found.append(proc.pid)
    return found


def idle_standby(hive: HiveProc) -> int:
    """The hive's one standby that is no worker (not listed by the hive)."""
    listed = {w["pid"] for w in httpx.get(f"{hive.url}/v1/workers").json()["workers"]}
    return wait_for(
        "an idle standby", lambda: next((p for p in standbys(hive.hive_id) if p not in listed), 0)
    )


def spawn_through_standby(hive: HiveProc) -> dict[str, Any]:
    """A worker forked by the hive's standby: one that has not said yet it is a standby is not
    asked (the worker starts afresh then), so spawns are stopped and tried again until one is."""
    for _ in range(20):
        waiting = idle_standby(hive)
        response = httpx.post(
            f"{hive.url}/v1/workers/spawn", json={"model": DEFAULT_MODEL}, timeout=120
        )
        assert response.status_code == 201, response.text
        spawned: dict[str, Any] = response.json()
        if psutil.Process(spawned["pid"]).ppid() == waiting:
            return spawned
        stop(hive, spawned["pid"])
        time.sleep(1.0)
    raise AssertionError("no spawn went through the standby")


def stop(hive: HiveProc, pid: int) -> None:
    httpx.post(f"{hive.url}/v1/workers/{pid}/stop", json={}, timeout=60).raise_for_status()


def queen_worker(queen: Daemon, worker_id: str) -> dict[str, Any] | None:
    workers = httpx.get(f"{queen.url}/v1/workers", timeout=5).json()["workers"]
    return next((w for w in workers if w["id"] == worker_id), None)


def test_a_worker_started_through_the_standby_is_a_worker_like_any_other(
    queen: Daemon, start_hive: HiveStarter, tmp_path: Path
) -> None:
    hive = start_hive()
    spawned = spawn_through_standby(hive)
    standby = psutil.Process(spawned["pid"]).ppid()

    assert "--standby" in psutil.Process(spawned["pid"]).cmdline()
    [listed] = httpx.get(f"{hive.url}/v1/workers").json()["workers"]
    assert (listed["pid"], listed["worker_id"]) == (spawned["pid"], spawned["worker_id"])
    assert (listed["model"], listed["port"]) == (DEFAULT_MODEL, spawned["port"])
    assert listed["cpu_set"] == spawned["cpu_set"]
    seen = wait_for(
        "the worker ready in the queen",
        lambda: (w := queen_worker(queen, spawned["worker_id"])) and w["status"] == "ready" and w,
    )
    assert (seen["hive_id"], seen["model_id"]) == (hive.hive_id, DEFAULT_MODEL)
    answer = httpx.post(
        f"{spawned['url']}/v1/chat/completions",
        json={
            "model": DEFAULT_MODEL,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
            "temperature": 0,
        },
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"]
    # Its output is in the worker's usual log, as `rbee worker logs` reads it.
    log = (tmp_path / "logs" / f"worker-{spawned['worker_id']}.log").read_text()
    assert "ready" in log
    tail = httpx.get(f"{hive.url}/v1/workers/{spawned['worker_id']}/log").text
    assert "ready" in tail

    # The standby stays for the next worker, and is no worker itself.
    assert idle_standby(hive) == standby
    assert len(httpx.get(f"{hive.url}/v1/workers").json()["workers"]) == 1

    stopped = httpx.post(f"{hive.url}/v1/workers/{spawned['pid']}/stop", json={}, timeout=60)
    assert stopped.json()["exit_code"] == 0  # its standby reaped it and told the hive
    assert httpx.get(f"{hive.url}/v1/workers").json()["workers"] == []
    again = spawn_through_standby(hive)  # the same standby forks the next one
    assert psutil.Process(again["pid"]).ppid() == standby
    stop(hive, again["pid"])
    wait_for(
        "the queen to hear it stopped",
        lambda: (
            (w := queen_worker(queen, spawned["worker_id"])) is None
            or w["status"] in ("stopped", "offline")
        ),
    )


def test_an_idle_standby_cannot_be_stopped_as_a_worker(start_hive: HiveStarter) -> None:
    hive = start_hive()
    pid = idle_standby(hive)
    response = httpx.post(f"{hive.url}/v1/workers/{pid}/stop", json={}, timeout=30)
    assert response.status_code == 404
    assert psutil.Process(pid).is_running()


def test_a_killed_hive_leaves_the_worker_a_new_hive_finds_and_no_standby(
    queen: Daemon, start_hive: HiveStarter
) -> None:
    hive = start_hive()
    spawned = spawn_through_standby(hive)
    waiting = idle_standby(hive)

    hive.proc.signal(signal.SIGKILL)
    hive.proc.wait()
    # The standby ends with its hive; the worker it forked serves on.
    wait_for("the idle standby to end", lambda: not psutil.pid_exists(waiting) or None)
    assert httpx.get(f"{spawned['url']}/health").status_code == 200

    again = start_hive(hive_id=hive.hive_id, port=hive.port)
    listed = httpx.get(f"{again.url}/v1/workers").json()["workers"]
    assert [(w["pid"], w["worker_id"], w["model"]) for w in listed] == [
        (spawned["pid"], spawned["worker_id"], DEFAULT_MODEL)
    ]
    stop(again, spawned["pid"])
    assert httpx.get(f"{again.url}/v1/workers").json()["workers"] == []


def test_a_stopped_hive_leaves_no_standby(start_hive: HiveStarter) -> None:
    hive = start_hive()
    pid = idle_standby(hive)
    hive.proc.signal(signal.SIGTERM)
    hive.proc.wait()
    wait_for("the standby to end", lambda: not psutil.pid_exists(pid) or None, timeout_s=30)
    assert standbys(hive.hive_id) == []


def test_with_no_standby_the_hive_keeps_none_and_still_spawns(start_hive: HiveStarter) -> None:
    hive = start_hive(flags=("--no-standby",))
    response = httpx.post(
        f"{hive.url}/v1/workers/spawn", json={"model": DEFAULT_MODEL}, timeout=120
    )
    assert response.status_code == 201, response.text
    spawned = response.json()
    assert "--standby" not in psutil.Process(spawned["pid"]).cmdline()
    assert standbys(hive.hive_id) == []
    stop(hive, spawned["pid"])
