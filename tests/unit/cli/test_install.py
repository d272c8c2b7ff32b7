"""The remote half of `rbee hive install`: the script it sends, run here with `sh` against a
throwaway HOME whose Python half is already installed, so the llama.cpp half runs for real
(scripts/llama_build.sh, fake `nvcc`/`nvidia-smi`, no compiler on PATH)."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from rbee.cli import install as installer
from rbee.cli.context import CliError
from rbee.cli.ssh import Result, Shell

ROOT = Path(__file__).parents[3]
SCRIPT = ROOT / "scripts" / "llama_build.sh"
TOOLS = (
    *("sh", "bash", "cat", "cmp", "cp", "mv", "chmod", "mkdir", "rm", "hostname", "sed", "head"),
    *("tail", "uname", "grep", "tr", "sort", "paste", "sha256sum", "cut", "dirname", "flock"),
    *("getconf", "printf"),
)
NVCC_OK = 'echo "Cuda compilation tools, release 12.4, V12.4.131"'
NVIDIA_SMI_OK = """\
case "$*" in
  -L) echo "GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-1111)" ;;
  *compute_cap*) echo 8.9 ;;
esac
"""


def executable(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


class Remote:
    """A machine with rbee's Python half installed and a llama.cpp build cache to fill."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tools = tmp_path / "tools"
        self.tools.mkdir()
        for tool in TOOLS:
            if (found := shutil.which(tool)) is None:
                pytest.skip(f"no {tool} on this machine")
            (self.tools / tool).symlink_to(found)
        self.home = tmp_path / "home"
        self.cache = tmp_path / "cache"
        self.base = self.home / ".local" / "share" / "rbee"
        dist = self.base / "dist"
        dist.mkdir(parents=True)
        wheel = dist / "rbee-0.1.0-py3-none-any.whl"
        wheel.write_bytes(b"a wheel")
        for source in (ROOT / "requirements.lock", ROOT / "engine.lock", SCRIPT):
            shutil.copy(source, dist / source.name)
        self.bundle = installer.Bundle(
            wheel, dist / "requirements.lock", dist / "engine.lock", dist / SCRIPT.name
        )
        (self.base / "installed").write_text(self.bundle.stamp + "\n")
        self.venv_bin = self.base / "venv" / "bin"
        executable(self.venv_bin / "rbee-hive", "exit 0")
        executable(self.venv_bin / "rbee", 'echo "rbee 0.1.0"')
        executable(self.venv_bin / "python", "exit 1")  # never asked for anything here
        monkeypatch.setenv("HOME", str(self.home))
        monkeypatch.setenv("PATH", str(self.tools))
        monkeypatch.setenv("RBEE_LLAMA_CACHE", str(self.cache))
        monkeypatch.delenv("CMAKE_ARGS", raising=False)
        monkeypatch.delenv("CUDA_HOME", raising=False)

    def has_a_gpu(self) -> None:
        executable(self.tools / "nvcc", NVCC_OK)
        executable(self.tools / "nvidia-smi", NVIDIA_SMI_OK)

    def cached_build(self, cmake_args: str | None = None, *, name: str = "server") -> Path:
        """Put a llama-server in the cache folder this machine's build would have."""
        call = f'llama_build_dir "$(llama_version "{ROOT / "engine.lock"}")" "$(llama_cmake_args)"'
        env = {"PATH": str(self.tools), "RBEE_LLAMA_CACHE": str(self.cache)}
        if cmake_args is not None:
            env["CMAKE_ARGS"] = cmake_args
        folder = Path(
            subprocess.run(
                ["bash", "-c", f'source "{SCRIPT}" && {call}'],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
        executable(folder / "bin" / "llama-server", f"echo {name}")
        executable(folder / "bin" / "ggml-rpc-server", f"echo rpc-{name}")
        return folder

    async def install(self, bundle: installer.Bundle | None = None) -> Result:
        lines: list[str] = []
        return await Shell().stream((bundle or self.bundle).script(), lines.append, timeout_s=60)


@pytest.fixture
def remote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Remote:
    return Remote(tmp_path, monkeypatch)


async def test_the_cached_build_is_installed_once_and_named(remote: Remote) -> None:
    build = remote.cached_build()
    first = await remote.install()
    assert first.code == 0, first.out
    assert installer.verdict(Shell(), first) == installer.Installed("installed", "cpu")
    assert f"rbee: build cpu {build}" in first.out
    # The RPC server that lends this machine's devices to split workers comes with it.
    assert (remote.venv_bin / "ggml-rpc-server").read_text().strip().endswith("echo rpc-server")
    engine = remote.venv_bin / "llama-server"
    assert engine.read_bytes() == (build / "bin" / "llama-server").read_bytes()
    assert engine.stat().st_mode & stat.S_IXUSR

    second = await remote.install()
    assert installer.verdict(Shell(), second) == installer.Installed("already-installed", "cpu")


async def test_a_gpu_machine_is_given_the_cuda_build(remote: Remote) -> None:
    remote.cached_build(name="cpu")
    remote.has_a_gpu()
    cuda = remote.cached_build(name="cuda")
    done = await remote.install()
    assert installer.verdict(Shell(), done).build == "cuda"
    assert f"rbee: build cuda {cuda}" in done.out
    assert (remote.venv_bin / "llama-server").read_bytes() == (
        cuda / "bin" / "llama-server"
    ).read_bytes()


async def test_cmake_args_given_to_install_replace_the_remotes_choice(remote: Remote) -> None:
    remote.cached_build()
    cuda = remote.cached_build("-DGGML_CUDA=on", name="cuda")  # no nvidia-smi on its PATH
    bundle = installer.Bundle(
        remote.bundle.wheel,
        remote.bundle.lock,
        remote.bundle.engine_lock,
        remote.bundle.build_script,
        cmake_args="-DGGML_CUDA=on",
    )
    done = await remote.install(bundle)
    assert installer.verdict(Shell(), done).build == "cuda"
    assert f"rbee: build cuda {cuda}" in done.out


async def test_a_machine_that_must_compile_without_a_compiler_says_what_to_install(
    remote: Remote,
) -> None:
    remote.cached_build()
    remote.has_a_gpu()  # a CUDA build, which is not in the cache
    done = await remote.install()
    assert done.code == installer.NO_TOOLS
    with pytest.raises(CliError) as failure:
        installer.verdict(Shell(), done)
    message = str(failure.value)
    assert "lacks what compiling llama.cpp needs: a C compiler, a C++ compiler" in message
    assert "build-essential" in message
    assert "\n" not in message
    assert not (remote.venv_bin / "llama-server").exists()


def test_the_python_half_alone_decides_the_stamp(tmp_path: Path) -> None:
    files = {n: tmp_path / n for n in ("rbee.whl", "req.lock", "engine.lock", "build.sh")}
    for name, path in files.items():
        path.write_text(name)
    bundle = installer.Bundle(*files.values())
    before = bundle.stamp
    files["build.sh"].write_text("another build script")
    assert bundle.stamp == before  # the llama.cpp half is keyed by its build cache instead
    files["req.lock"].write_text("other pins")
    assert bundle.stamp != before


def test_the_cmake_args_travel_quoted_in_the_script(tmp_path: Path) -> None:
    paths = [tmp_path / n for n in ("rbee.whl", "req.lock", "engine.lock", "build.sh")]
    for path in paths:
        path.write_text("x")
    script = installer.Bundle(*paths, cmake_args="-DGGML_CUDA=on -DX='y z'").script()
    assert "CMAKE_ARGS='-DGGML_CUDA=on -DX='\"'\"'y z'\"'\"''; export CMAKE_ARGS" in script
    assert "CMAKE_ARGS" not in installer.Bundle(*paths).script()


@pytest.mark.parametrize(
    ("code", "out", "expected"),
    [
        (installer.NO_PYTHON, "rbee: error no Python 3.11 or newer on b", "needs Python 3.11"),
        (
            installer.BUILD_FAILED,
            "[ 9%] cc\nrbee: error building llama.cpp failed; the log is /x/build.log",
            "box: building llama.cpp failed; the log is /x/build.log",
        ),
        (1, "pip: no such wheel", "installing on box failed (exit 1): pip: no such wheel"),
    ],
)
def test_failures_are_one_line_reasons(code: int, out: str, expected: str) -> None:
    shell = Shell()
    shell.where = "box"
    with pytest.raises(CliError, match=r".*") as failure:
        installer.verdict(shell, Result(code, out, ""))
    assert expected in str(failure.value)
