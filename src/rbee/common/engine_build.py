"""Where llama.cpp's `llama-server` comes from on a machine where rbee was installed with pip.

`./dev` builds it and copies it next to the venv's interpreter. A `pip install` or `pipx install`
has no such step, so the wheel carries what building needs (`scripts/llama_build.sh` and
`engine.lock`, as `rbee/engine/`), and the first `rbee up` compiles it into the same cache
`./dev` uses (`~/.cache/rbee/llama.cpp`, or `$RBEE_LLAMA_CACHE`), under the same key: one build
per llama.cpp version and build flags, shared by every venv of the user.

Looked for in this order: next to the interpreter (./dev), the cache, then `PATH`.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SERVER_BINARY = "llama-server"
BUILD_SCRIPT = "llama_build.sh"
ENGINE_LOCK = "engine.lock"
# In the wheel (pyproject's force-include); in a source checkout, the repository's own files.
PACKAGED = Path(__file__).resolve().parent.parent / "engine"
CHECKOUT = Path(__file__).resolve().parents[3]
PROGRESS = re.compile(r"compiling llama\.cpp: (\d+)%")
LOOKUP_TIMEOUT_S = 60.0
BUILD_TIMEOUT_S = 4 * 3600.0


class EngineBuildError(Exception):
    """Building llama-server failed, or cannot start; the message says what to do."""


@dataclass(frozen=True)
class EngineFiles:
    script: Path
    lock: Path


def engine_files() -> EngineFiles | None:
    """The build script and the lock that pins llama.cpp's sources, wherever rbee runs from."""
    for base, script in ((PACKAGED, PACKAGED / BUILD_SCRIPT), (CHECKOUT, None)):
        script = script or base / "scripts" / BUILD_SCRIPT
        lock = base / ENGINE_LOCK
        if script.is_file() and lock.is_file():
            return EngineFiles(script, lock)
    return None


def _bash(files: EngineFiles, command: str) -> str:
    done = subprocess.run(
        # $0 is not the script: sourced with $0 equal to its own path, it runs as a program.
        ["bash", "-c", f'source "$1"; {command}', "rbee", str(files.script)],
        capture_output=True,
        text=True,
        timeout=LOOKUP_TIMEOUT_S,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise EngineBuildError(done.stderr.strip() or f"{command} failed")
    return done.stdout.strip()


@functools.lru_cache(maxsize=1)
def _build_dir(script: Path, lock: Path, cmake_args: str | None, cache: str | None) -> Path:
    files = EngineFiles(script, lock)
    lock_arg = str(lock).replace('"', '\\"')
    return Path(
        _bash(files, f'llama_build_dir "$(llama_version "{lock_arg}")" "$(llama_cmake_args)"')
    )


def build_dir() -> Path | None:
    """The cache folder of the build this machine gets (the key ./dev and `rbee hive install`
    use: llama.cpp's version, and CUDA, Metal or CPU as the machine calls for)."""
    files = engine_files()
    if files is None or shutil.which("bash") is None:
        return None
    try:
        return _build_dir(
            files.script,
            files.lock,
            os.environ.get("CMAKE_ARGS"),
            os.environ.get("RBEE_LLAMA_CACHE"),
        )
    except (EngineBuildError, OSError, subprocess.TimeoutExpired):
        return None


def build_kind() -> str | None:
    """cuda, metal or cpu: what a build on this machine would be."""
    files = engine_files()
    if files is None:
        return None
    try:
        return _bash(files, 'llama_build_kind "$(llama_cmake_args)"')
    except (EngineBuildError, OSError, subprocess.TimeoutExpired):
        return None


def cached_llama_server() -> Path | None:
    folder = build_dir()
    if folder is None:
        return None
    binary = folder / "bin" / SERVER_BINARY
    return binary if os.access(binary, os.X_OK) else None


def find_llama_server() -> Path | None:
    """The `llama-server` workers run here, or None when it is not built yet."""
    beside = Path(sys.executable).parent / SERVER_BINARY
    if os.access(beside, os.X_OK):
        return beside
    if (cached := cached_llama_server()) is not None:
        return cached
    on_path = shutil.which(SERVER_BINARY)
    return Path(on_path) if on_path else None


def build_llama_server(on_line: Callable[[str], None]) -> Path:
    """Compile llama-server into the cache (once: a second caller waits for the first and uses
    its build). `on_line` gets the script's messages, its progress among them
    ("compiling llama.cpp: 40% (3m2s)"). Returns the binary."""
    files = engine_files()
    if files is None:
        raise EngineBuildError(
            "this rbee has no llama.cpp build recipe (rbee/engine/ is missing from its "
            "installation): reinstall rbee from its wheel, or put llama-server on PATH"
        )
    env = {**os.environ, "LLAMA_SAY": "rbee:", "LLAMA_FAIL": "rbee:"}
    command = ["bash", str(files.script), "ensure", sys.executable, str(files.lock)]
    with subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        assert proc.stderr is not None
        assert proc.stdout is not None
        last = ""
        for line in proc.stderr:
            line = line.rstrip("\n")
            if line:
                last = line
                on_line(line)
        folder = proc.stdout.read().strip()
        code = proc.wait(timeout=BUILD_TIMEOUT_S)
    if code != 0 or not folder:
        raise EngineBuildError(last.removeprefix("rbee:").strip() or "building llama.cpp failed")
    _build_dir.cache_clear()
    binary = Path(folder) / "bin" / SERVER_BINARY
    if not os.access(binary, os.X_OK):
        raise EngineBuildError(f"the build finished but {binary} is not there")
    return binary


def progress_of(line: str) -> int | None:
    """The percentage a build line reports, if it reports one."""
    found = PROGRESS.search(line)
    return int(found.group(1)) if found else None
