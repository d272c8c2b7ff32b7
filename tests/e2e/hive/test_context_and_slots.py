"""Context size and slots, as a user sets them, with a real queen, hive, SmolLM2 worker and the
real `rbee` CLI: the model's own context and two slots by default, --ctx-size/--slots when
given, both shown by `rbee models` and `/v1/models`, and a prompt over the context refused with
the flag that raises it."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import httpx
import pytest

from rbee.common.bundled import DEFAULT_MODEL
from rbee_testing.processes import console_script

from .conftest import Daemon, HiveStarter

pytestmark = pytest.mark.e2e


def rbee(queen: Daemon, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RBEE_QUEEN_URL": queen.url, "COLUMNS": "250"}
    env.pop("RBEE_TOKEN", None)
    return subprocess.run(
        [console_script("rbee"), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def contexts(queen: Daemon) -> list[dict[str, Any]]:
    models = httpx.get(f"{queen.url}/v1/models", timeout=10).json()["data"]
    card = next(m for m in models if m["id"] == DEFAULT_MODEL)
    found: list[dict[str, Any]] = card["rbee"]["worker_contexts"]
    return found


def wait_hive(queen: Daemon) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        hives = httpx.get(f"{queen.url}/v1/hives", timeout=5).json()["hives"]
        if any(h["online"] and DEFAULT_MODEL in h["models"] for h in hives):
            return
        time.sleep(0.2)
    raise AssertionError("the hive never reported its models")


def test_a_worker_started_on_demand_gets_the_models_trained_context_and_two_slots(
    queen: Daemon, start_hive: HiveStarter
) -> None:
    start_hive()
    wait_hive(queen)
    answer = httpx.post(
        f"{queen.url}/v1/chat/completions",
        json={
            "model": DEFAULT_MODEL,
            "messages": [{"role": "user", "content": "Say hi"}],
            "max_tokens": 4,
        },
        timeout=300,
    )
    assert answer.status_code == 200, answer.text
    # SmolLM2-135M was trained on 8192 tokens; a CPU with room takes all of them, twice.
    [worker] = contexts(queen)
    assert (worker["ctx_size"], worker["slots"]) == (8192, 2)
    listed = rbee(queen, "models")
    assert listed.returncode == 0, listed.stderr
    assert "CONTEXT x SLOTS" in listed.stdout
    assert "8192x2" in listed.stdout


def test_ctx_size_and_slots_given_to_worker_spawn_are_what_the_worker_serves_with(
    queen: Daemon, start_hive: HiveStarter
) -> None:
    start_hive()
    wait_hive(queen)
    spawned = rbee(
        queen, "worker", "spawn", "-m", DEFAULT_MODEL, "--ctx-size", "256", "--slots", "3"
    )
    assert spawned.returncode == 0, spawned.stderr
    assert "256 tokens x 3 slots" in spawned.stdout
    [worker] = contexts(queen)
    assert (worker["ctx_size"], worker["slots"]) == (256, 3)
    workers = rbee(queen, "worker", "list", "--json")
    assert '"ctx_size": 256' in workers.stdout

    # A prompt longer than the 256 tokens: refused, and the message says how to get more.
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 60
    refused = httpx.post(
        f"{queen.url}/v1/chat/completions",
        json={"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": long_prompt}]},
        timeout=120,
    )
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "maximum context length is 256 tokens" in error["message"]
    assert "--ctx-size" in error["message"]


def test_a_context_beyond_the_trained_one_is_reported_as_served(
    queen: Daemon, start_hive: HiveStarter
) -> None:
    """llama.cpp gives a slot no more than the model was trained on (8192 for SmolLM2): the
    worker says what it serves, not what was asked (the queen and `rbee models` read 16384
    before, and a 9,000-token prompt still failed)."""
    hive = start_hive()
    wait_hive(queen)
    spawned = rbee(
        queen, "worker", "spawn", "-m", DEFAULT_MODEL, "--ctx-size", "16384", "--slots", "1"
    )
    assert spawned.returncode == 0, spawned.stderr
    deadline = time.monotonic() + 30
    while contexts(queen)[0]["ctx_size"] != 8192 and time.monotonic() < deadline:
        time.sleep(0.2)
    [worker] = contexts(queen)
    assert (worker["ctx_size"], worker["slots"]) == (8192, 1)
    log = httpx.get(f"{hive.url}/v1/workers/{worker['worker_id']}/log", timeout=10).text
    assert "--ctx-size 16384 is more than" in log
