"""Recognising this hive's workers from a command line, and the command line the hive writes."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from rbee.common.worker_command import parse_flags
from rbee.contracts.hive_api import CatalogModel, SpawnRequest
from rbee.hive.catalog import Catalog
from rbee.hive.cores import CorePlacement
from rbee.hive.settings import HiveSettings
from rbee.hive.supervisor import Supervisor, worker_flags
from rbee.hive.worker_logs import output_tail

SCRIPT = "/opt/venv/bin/llm-worker-rbee"


def test_flags_in_both_spellings() -> None:
    assert parse_flags(["--a", "1", "--b=2", "x", "--c"]) == {"--a": "1", "--b": "2"}


@pytest.mark.parametrize(
    "cmdline",
    [
        ["/usr/bin/python3", SCRIPT, "--hive-id", "h1", "--worker-id", "w", "--port", "8080"],
        [SCRIPT, "--hive-id=h1", "--worker-id=w", "--port=8080", "--model", "m.gguf"],
    ],
)
def test_a_worker_of_this_hive_is_recognised(cmdline: list[str]) -> None:
    flags = worker_flags(cmdline, "h1")
    assert flags is not None
    assert flags["--worker-id"] == "w"


@pytest.mark.parametrize(
    "cmdline",
    [
        [],
        ["/usr/bin/python3", SCRIPT, "--hive-id", "h2", "--worker-id", "w", "--port", "8080"],
        ["/usr/bin/python3", SCRIPT, "--worker-id", "w", "--port", "8080"],
        ["/usr/bin/python3", SCRIPT, "--hive-id", "h1", "--port", "8080"],
        ["/usr/bin/python3", SCRIPT, "--hive-id", "h1", "--worker-id", "w", "--port", "x"],
        ["sleep", "--hive-id", "h1", "--worker-id", "w", "--port", "8080"],
        ["bash", "-c", f"{SCRIPT} --hive-id h1 --worker-id w --port 8080"],
    ],
)
def test_anything_else_is_not(cmdline: list[str]) -> None:
    assert worker_flags(cmdline, "h1") is None


def test_the_worker_command_carries_identity_but_not_the_token(tmp_path: Path) -> None:
    settings = HiveSettings(
        queen_url="http://q:7833",
        hive_id="h1",
        host="0.0.0.0",
        advertise_host="box.lan",
        worker_command=SCRIPT,
        token="s3cret",
        heartbeat_interval=5,
    )
    supervisor = Supervisor(settings, Catalog(tmp_path), httpx.AsyncClient())
    model = CatalogModel(
        id="o/r:f.gguf",
        name="f",
        path="/m/o/r/f.gguf",
        size_bytes=1,
        format="gguf",
        source="huggingface",
    )
    request = SpawnRequest(model="o/r:f.gguf", slots=2)
    args = supervisor.command("w1", model, 8081, request, CorePlacement((2, 3), shared=False))
    assert args[0] == SCRIPT
    assert worker_flags(args, "h1") is not None
    flags = parse_flags(args)
    assert flags["--model"] == "/m/o/r/f.gguf"
    assert flags["--model-id"] == "o/r:f.gguf"
    assert flags["--host"] == "0.0.0.0"
    assert flags["--advertise-host"] == "box.lan"
    assert flags["--slots"] == "2"
    assert flags["--heartbeat-interval"] == "5.0"
    assert "s3cret" not in " ".join(args)
    assert flags["--cpu-set"] == "2-3"
    assert "--wait-policy" not in flags
    shared = supervisor.command("w2", model, 8082, request, CorePlacement((0,), shared=True))
    assert parse_flags(shared)["--wait-policy"] == "passive"
    # auto, the worker's own default, is left unsaid; any other choice is passed on.
    assert "--kv-cache-type" not in flags
    for kv in ("q8_0", "f16"):
        chosen = request.model_copy(update={"kv_cache_type": kv})
        args = supervisor.command("w3", model, 8083, chosen, CorePlacement((0,), shared=False))
        assert parse_flags(args)["--kv-cache-type"] == kv
    # The prompt cache the queen sized is passed on; none asked, the worker's default (none).
    assert "--prompt-cache" not in flags
    sized = request.model_copy(update={"prompt_cache_bytes": 96 << 20})
    args = supervisor.command("w4", model, 8084, sized, CorePlacement((0,), shared=False))
    assert parse_flags(args)["--prompt-cache"] == str(96 << 20)


def test_output_tail_keeps_the_end(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    log.write_text("x" * 10_000 + "\nthe reason\n")
    assert output_tail(log).endswith("the reason")
    assert len(output_tail(log)) <= 4000
    assert output_tail(tmp_path / "missing.log") == ""
