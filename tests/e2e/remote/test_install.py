"""`rbee hive install --ssh`: this checkout as a wheel, installed on the box with its pinned
dependencies and the llama.cpp build the box's own build script chooses, and a second run that
changes nothing.

The box has no package index, so it cannot fetch llama.cpp's sources and compile them (which
takes ~15 minutes anyway): its build cache is given this machine's build, as if it had compiled
once before. The box finds it only under the key its own detection computes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Box
from .test_remote_hive import rbee_env, run

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[3]
LOCK = ROOT / "requirements.lock"


def local_build() -> Path:
    """The folder of this machine's llama.cpp build, as scripts/llama_build.sh keys it."""
    env = {k: v for k, v in os.environ.items() if k != "CMAKE_ARGS"}
    call = 'llama_build_dir "$(llama_version engine.lock)" "$(llama_cmake_args)"'
    found = subprocess.run(
        ["bash", "-c", f"source scripts/llama_build.sh && {call}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(found.stdout.strip())


def test_install_puts_a_working_rbee_hive_on_the_box_once(
    box: Box, token: str, tmp_path: Path
) -> None:
    build = local_build()
    if not (build / "bin" / "llama-server").exists():
        pytest.skip(f"no llama.cpp build in {build} (./dev install compiles it)")
    cached = box.home / ".cache" / "rbee" / "llama.cpp" / build.name
    shutil.copytree(build, cached)
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
    assert "llama.cpp build: cpu" in first.stdout
    assert "compiling" not in first.stderr  # the box's cache had its build

    venv = box.home / ".local" / "share" / "rbee" / "venv"
    hive = box.lan.run(
        box.name, [str(box.home / ".local" / "bin" / "rbee-hive"), "--help"], check=False
    )
    assert hive.returncode == 0, hive.stderr
    assert "--queen-url" in hive.stdout
    engine = venv / "bin" / "llama-server"
    assert engine.read_bytes() == (cached / "bin" / "llama-server").read_bytes()
    version = box.lan.run(box.name, [str(engine), "--version"], check=False)
    assert version.returncode == 0, version.stderr
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
    assert "llama.cpp build: cpu" in second.stdout
