"""Run the real `rbee` program, with its state directory and model files in a temporary place."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from rbee_testing.processes import console_script

RBEE = console_script("rbee")
Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "RBEE_STATE_DIR": str(tmp_path / "run"), "COLUMNS": "200"}
    for name in ("RBEE_TOKEN", "RBEE_QUEEN_URL"):
        env.pop(name, None)
    return env


@pytest.fixture
def rbee(env: dict[str, str]) -> Run:
    """`rbee ARGS…` as a real process; its exit code, stdout and stderr."""

    def run(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [RBEE, *args], env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )

    return run


def processes_mentioning(*needles: str) -> list[psutil.Process]:
    """Live rbee processes whose command line holds every needle (e.g. a port)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if all(n in cmdline for n in needles) and proc.status() != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


@pytest.fixture
def reaper() -> Iterator[list[str]]:
    """Needles (ports, URLs) whose processes are killed after the test, whatever happened."""
    needles: list[str] = []
    yield needles
    for needle in needles:
        for proc in processes_mentioning(needle):
            if any(name in " ".join(proc.cmdline()) for name in ("rbee", "llm-worker")):
                proc.kill()
