"""`rbee hive install --ssh`: this checkout as a wheel, installed on the box with its pinned
dependencies, and a second run that changes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Box
from .test_remote_hive import rbee_env, run

pytestmark = pytest.mark.e2e
ENGINE = Path(sys.executable).parent / "llama-server"
LOCK = Path(__file__).parents[3] / "requirements.lock"


def test_install_puts_a_working_rbee_hive_on_the_box_once(
    box: Box, token: str, tmp_path: Path
) -> None:
    if not ENGINE.exists():
        pytest.skip(f"no llama-server at {ENGINE} to copy (run ./dev install)")
    wheels = box.home / ".local" / "share" / "rbee" / "wheels"
    wheels.mkdir(parents=True)
    # The box has no route to a package index: fetch the pinned wheels here.
    pins = tmp_path / "pins.txt"
    pins.write_text(
        "\n".join(line for line in LOCK.read_text().splitlines() if line and line[0] != "#")
    )
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    download += ["--only-binary=:all:", "-r", str(pins), "-d", str(wheels)]
    fetched = subprocess.run(download, capture_output=True, text=True, timeout=600, check=False)
    if fetched.returncode != 0:
        pytest.skip(f"cannot fetch the pinned wheels here: {fetched.stderr.strip()[-200:]}")
    env = rbee_env(box, "http://127.0.0.1:1", token, tmp_path)

    first = run(env, "hive", "install", "--ssh", box.target, timeout_s=900)
    assert first.returncode == 0, first.stderr
    assert f"rbee is installed on {box.target}" in first.stdout
    assert "llama.cpp's server" in first.stderr

    venv = box.home / ".local" / "share" / "rbee" / "venv"
    hive = box.lan.run(
        box.name, [str(box.home / ".local" / "bin" / "rbee-hive"), "--help"], check=False
    )
    assert hive.returncode == 0, hive.stderr
    assert "--queen-url" in hive.stdout
    engine = box.lan.run(box.name, [str(venv / "bin" / "llama-server"), "--version"], check=False)
    assert engine.returncode == 0, engine.stderr
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import rbee; print(rbee.__file__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    assert str(venv) in probe.stdout  # the installed copy, not this checkout

    second = run(env, "hive", "install", "--ssh", box.target, timeout_s=300)
    assert second.returncode == 0, second.stderr
    assert f"rbee is already installed on {box.target}" in second.stdout
