"""`rbee status`, `rbee models`, `rbee worker list`, and what every command does without a queen."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbee.contracts.hives import HiveHeartbeat, HiveInfo
from rbee.contracts.workers import WorkerHeartbeat, WorkerInfo, WorkerStatus
from rbee.queen.app import create_app
from rbee.queen.settings import QueenSettings

NO_QUEEN = (
    "rbee: queen is not running at http://127.0.0.1:7833 — "
    "start it with `rbee queen start` or `rbee up`"
)


def test_status_shows_hives_and_workers_as_a_table(rbee: Any, queen: Any) -> None:
    queen.add_hive("hive-a")
    queen.add_worker("w-1", in_flight=1, slots=2, port=8081, last_seen_s=3.2)
    queen.add_worker("w-2", status="busy", online=False, available=False, model_id="tinyllama")

    result = rbee("status")

    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "1 hive(s), 2 worker(s), 1 ready" in out
    assert "hive-a" in out
    assert "online" in out
    assert "cpu:0" in out
    header = next(line for line in out.splitlines() if line.startswith("WORKER"))
    for column in ("MODEL", "STATUS", "LOAD", "ADDRESS", "LAST SEEN"):
        assert column in header
    w1 = next(line for line in out.splitlines() if line.startswith("w-1"))
    assert "smollm2-135m-instruct" in w1
    assert "ready" in w1
    assert "1/2" in w1
    assert "127.0.0.1:8081" in w1
    assert "3s ago" in w1
    w2 = next(line for line in out.splitlines() if line.startswith("w-2"))
    assert "offline" in w2
    assert "tinyllama" in w2


def test_status_json_is_for_scripts(rbee: Any, queen: Any) -> None:
    queen.add_hive("hive-a")
    queen.add_worker("w-1")

    result = rbee("status", "--json")

    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["queen_url"] == "http://127.0.0.1:7833"
    assert [h["id"] for h in data["hives"]] == ["hive-a"]
    assert data["workers"][0]["id"] == "w-1"
    assert data["workers"][0]["status"] == "ready"
    assert data["workers"][0]["available"] is True


def test_status_with_an_empty_cluster_says_how_to_start_a_worker(rbee: Any) -> None:
    result = rbee("status")

    assert result.exit_code == 0
    assert "0 worker(s)" in result.stdout
    assert "rbee worker spawn" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["status", "--json"],
        ["models"],
        ["infer", "hello"],
        ["worker", "list"],
        ["worker", "spawn", "-m", "x"],
        ["worker", "stop", "w-1"],
        ["model", "rm", "x"],
    ],
)
def test_without_a_queen_every_command_says_so_in_one_line(
    rbee_no_queen: Any, args: list[str]
) -> None:
    result = rbee_no_queen(*args)

    assert result.exit_code == 1
    assert result.stderr.strip() == NO_QUEEN
    assert "Traceback" not in result.output


def test_the_queen_url_comes_from_the_flag_or_the_environment(rbee_no_queen: Any) -> None:
    by_flag = rbee_no_queen("--queen-url", "http://10.0.0.5:9000/", "status")
    by_env = rbee_no_queen("status", env={"RBEE_QUEEN_URL": "http://10.0.0.6:9001"})

    assert "queen is not running at http://10.0.0.5:9000 —" in by_flag.stderr
    assert "queen is not running at http://10.0.0.6:9001 —" in by_env.stderr


def test_the_token_is_sent_and_a_wrong_one_is_explained(
    rbee: Any, queen: Any, tmp_path: Path
) -> None:
    queen.token = "s3cret"
    queen.add_worker("w-1")
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")

    refused = rbee("status")
    by_file = rbee("--token-file", str(token_file), "status", "--json")
    by_env = rbee("status", "--json", env={"RBEE_TOKEN": "s3cret"})
    on_argv = rbee("--token", "s3cret", "status")

    assert refused.exit_code == 1
    assert refused.stderr.strip() == (
        "rbee: the queen at http://127.0.0.1:7833 refused the token — "
        "set RBEE_TOKEN or pass --token-file"
    )
    assert json.loads(by_file.stdout)["workers"][0]["id"] == "w-1"
    assert on_argv.exit_code == 2  # a secret on the command line is not an option
    assert json.loads(by_env.stdout)["workers"][0]["id"] == "w-1"


def test_models_shows_what_is_served_and_what_could_start(rbee: Any, queen: Any) -> None:
    queen.add_model("smollm2-135m-instruct", "loaded", workers=2)
    queen.add_model("tinyllama", "available", workers=0)

    table = rbee("models")
    as_json = rbee("models", "--json")

    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    loaded = next(line for line in lines if line.startswith("smollm2"))
    available = next(line for line in lines if line.startswith("tinyllama"))
    assert "loaded" in loaded
    assert " 2 " in loaded
    assert "hive-a" in loaded
    assert "available" in available
    assert " 0 " in available
    assert [m["id"] for m in json.loads(as_json.stdout)["models"]] == [
        "smollm2-135m-instruct",
        "tinyllama",
    ]


def test_models_with_nothing_says_how_to_get_one(rbee: Any) -> None:
    result = rbee("models")

    assert result.exit_code == 0
    assert "rbee model download" in result.stdout


def test_worker_list_table_and_json(rbee: Any, queen: Any) -> None:
    queen.add_worker("w-1", port=8099)

    table = rbee("worker", "list")
    as_json = rbee("worker", "list", "--json")

    assert "127.0.0.1:8099" in next(ln for ln in table.stdout.splitlines() if ln.startswith("w-1"))
    assert json.loads(as_json.stdout)["workers"][0]["port"] == 8099


def test_status_reads_the_real_queens_registry(rbee_on: Any) -> None:
    """Contract check: the CLI understands what the real queen app serves."""
    app = create_app(QueenSettings())
    rbee = rbee_on(lambda: httpx.ASGITransport(app=app))
    worker = WorkerInfo(
        id="w-real", model_id="m", port=8123, status=WorkerStatus.READY, version="1", hive_id="h"
    )
    hive = HiveHeartbeat(hive=HiveInfo(id="h", url="http://127.0.0.1:7835", version="1"))
    registry = app.state.queen
    registry.registry.update_worker(WorkerHeartbeat(worker=worker))
    registry.hives.update(hive)

    result = rbee("status", "--json")

    data = json.loads(result.stdout)
    assert data["workers"][0]["id"] == "w-real"
    assert data["workers"][0]["available"] is True
    assert data["hives"][0]["id"] == "h"


def test_status_says_which_models_were_unloaded_and_why(rbee_on: Any) -> None:
    """An eviction seen after the fact: the real queen remembers it, `rbee status` shows it."""
    app = create_app(QueenSettings())
    state = app.state.queen
    for change, model, reason in (
        ("loaded", "gemma", "on_demand"),
        ("unloaded", "gemma", "evicted"),
        ("loaded", "smollm2", "on_demand"),
    ):
        data = {"change": change, "model": model, "worker_id": f"h-{model}", "hive_id": "h"}
        state.bus.publish("model", {**data, "reason": reason})
    state.bus.publish("worker", {"change": "removed"})  # not a model event: not kept
    rbee = rbee_on(lambda: httpx.ASGITransport(app=app))

    result = rbee("status")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    shown = lines[lines.index("recent model loads and unloads:") + 1 :]
    assert [line.split()[1:4] for line in shown] == [
        ["loaded", "gemma", "(on_demand)"],
        ["unloaded", "gemma", "(evicted)"],
        ["loaded", "smollm2", "(on_demand)"],
    ]
    assert "worker h-gemma on h" in shown[1]
    events = json.loads(rbee("status", "--json").stdout)["model_events"]
    assert [(e["change"], e["reason"]) for e in events][1] == ("unloaded", "evicted")


@pytest.mark.parametrize("url", ["http://[::1", "http://127.0.0.1:99999", "ftp://queen"])
def test_a_bad_queen_url_is_a_usage_error_not_a_traceback(rbee: Any, url: str) -> None:
    result = rbee("--queen-url", url, "status")
    assert result.exit_code == 2
    assert "--queen-url" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_models_says_why_starting_a_model_is_on_hold(rbee: Any, queen: Any) -> None:
    queen.add_model("crashy", "available", workers=0)
    queen.models[-1]["rbee"]["backoff"] = [
        {
            "hive_id": "hive-a",
            "failures": 3,
            "reason": "worker crashy-8080 died 2s after ready (connection refused)",
            "retry_in_s": 17.4,
        }
    ]

    result = rbee("models")

    assert result.exit_code == 0
    (line,) = [line for line in result.stdout.splitlines() if "on hold" in line]
    assert "crashy" in line
    assert "hive-a" in line
    assert "17s" in line
    assert "3 failure(s)" in line
    assert "died 2s after ready" in line
