"""`rbee doctor` (issue 27, item 8): the real command checks this machine and says what to fix."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from rbee.common.bundled import DEFAULT_MODEL
from rbee_testing.processes import free_port

pytestmark = pytest.mark.e2e


def test_a_ready_machine_passes_with_every_check_named(rbee: Any) -> None:
    port = free_port()
    done = rbee("doctor", "--offline", "--port", str(port), "--hive-port", str(free_port()))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for name in ("compiler", "engine", f"port {port}", "GPUs", "model"):
        assert any(line.split()[1:2] == name.split()[:1] for line in lines), (name, done.stdout)
    engine = next(line for line in lines if " engine " in line)
    assert engine.split()[0] == "ok"
    assert "llama-server" in engine
    assert DEFAULT_MODEL in next(line for line in lines if " model " in line)
    assert lines[-1] == "rbee doctor: ready for rbee up"


def test_a_port_another_program_holds_blocks_and_names_the_way_out(rbee: Any) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        done = rbee("doctor", "--offline", "--port", str(port), "--hive-port", str(free_port()))
    assert done.returncode == 1, done.stdout
    [taken] = [line for line in done.stdout.splitlines() if f"port {port} " in line]
    assert taken.split()[0] == "FIX"
    assert "so the queen cannot listen there" in taken
    assert "→ rbee up --port N" in done.stdout
    assert f"block rbee up: port {port}" in done.stdout
