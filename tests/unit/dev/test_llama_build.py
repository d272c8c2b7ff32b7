"""./dev's choice of llama.cpp build, run against fake `nvcc`, `nvidia-smi` and `uname` on PATH."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[3]
SCRIPT = ROOT / "scripts" / "llama_build.sh"
NVIDIA_SMI_OK = """\
case "$*" in
  -L) echo "GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-1111)"
      echo "GPU 1: NVIDIA GeForce RTX 3090 (UUID: GPU-2222)" ;;
  *compute_cap*) printf '8.9\\n8.6\\n' ;;
esac
"""
# What nvidia-smi says on a machine with the toolkit but no driver (like this build machine).
NVIDIA_SMI_NO_DRIVER = """\
echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver." >&2
exit 9
"""
NVCC_OK = 'echo "Cuda compilation tools, release 12.4, V12.4.131"'


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """A PATH of the basic tools bash needs, and nothing of CUDA unless a test adds it."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("uname", "grep", "tr", "sort", "paste", "sha256sum", "cut", "cat"):
        if (found := shutil.which(tool)) is None:
            pytest.skip(f"no {tool} on this machine")
        (folder / tool).symlink_to(found)
    return folder


def fake(folder: Path, name: str, body: str) -> None:
    path = folder / name
    if path.is_symlink():
        path.unlink()
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def run(folder: Path, call: str, **env: str) -> str:
    bash = shutil.which("bash")
    assert bash is not None
    result = subprocess.run(
        [bash, "-c", f'source "{SCRIPT}" && {call}'],
        env={"PATH": str(folder), "HOME": "/nonexistent", **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return result.stdout.strip()


def test_a_toolkit_and_a_working_gpu_driver_get_a_cuda_build_for_those_gpus(bin_dir: Path) -> None:
    fake(bin_dir, "nvcc", NVCC_OK)
    fake(bin_dir, "nvidia-smi", NVIDIA_SMI_OK)
    args = run(bin_dir, "llama_cmake_args")
    assert "-DGGML_CUDA=on" in args.split()
    assert "-DCMAKE_CUDA_ARCHITECTURES=86;89" in args.split()
    assert "-DGGML_NATIVE=OFF" in args.split()  # the CPU half stays portable
    assert run(bin_dir, f'llama_build_kind "{args}"') == "cuda"


def test_the_toolkit_without_a_driver_gets_the_cpu_build(bin_dir: Path) -> None:
    fake(bin_dir, "nvcc", NVCC_OK)
    fake(bin_dir, "nvidia-smi", NVIDIA_SMI_NO_DRIVER)
    args = run(bin_dir, "llama_cmake_args")
    assert "CUDA" not in args
    assert run(bin_dir, f'llama_build_kind "{args}"') == "cpu"


def test_the_toolkit_without_nvidia_smi_gets_the_cpu_build(bin_dir: Path) -> None:
    fake(bin_dir, "nvcc", NVCC_OK)
    assert "CUDA" not in run(bin_dir, "llama_cmake_args")


def test_a_gpu_without_a_toolkit_or_with_a_broken_one_gets_the_cpu_build(bin_dir: Path) -> None:
    fake(bin_dir, "nvidia-smi", NVIDIA_SMI_OK)
    assert "CUDA" not in run(bin_dir, "llama_cmake_args")
    fake(bin_dir, "nvcc", "exit 1")
    assert "CUDA" not in run(bin_dir, "llama_cmake_args")


def test_a_toolkit_under_cuda_home_counts(bin_dir: Path, tmp_path: Path) -> None:
    cuda_bin = tmp_path / "cuda" / "bin"
    cuda_bin.mkdir(parents=True)
    fake(cuda_bin, "nvcc", NVCC_OK)
    fake(bin_dir, "nvidia-smi", NVIDIA_SMI_OK)
    args = run(bin_dir, "llama_cmake_args", CUDA_HOME=str(tmp_path / "cuda"))
    assert "-DGGML_CUDA=on" in args.split()


def test_cmake_args_override_the_detection(bin_dir: Path) -> None:
    fake(bin_dir, "nvcc", NVCC_OK)
    fake(bin_dir, "nvidia-smi", NVIDIA_SMI_OK)
    assert run(bin_dir, "llama_cmake_args", CMAKE_ARGS="-DGGML_VULKAN=on") == "-DGGML_VULKAN=on"
    assert run(bin_dir, 'llama_build_kind "-DGGML_CUDA=ON"') == "cuda"


def test_macos_gets_metal(bin_dir: Path) -> None:
    fake(bin_dir, "uname", 'case "$1" in -s) echo Darwin ;; -m) echo arm64 ;; esac')
    args = run(bin_dir, "llama_cmake_args")
    assert run(bin_dir, f'llama_build_kind "{args}"') == "metal"


def test_cpu_and_cuda_builds_are_cached_apart(bin_dir: Path) -> None:
    cpu = run(bin_dir, 'llama_build_dir 0.3.36 "$(llama_cmake_args)"', RBEE_LLAMA_CACHE="/c")
    fake(bin_dir, "nvcc", NVCC_OK)
    fake(bin_dir, "nvidia-smi", NVIDIA_SMI_OK)
    cuda = run(bin_dir, 'llama_build_dir 0.3.36 "$(llama_cmake_args)"', RBEE_LLAMA_CACHE="/c")
    assert cpu.startswith("/c/llama.cpp-0.3.36-")
    assert cuda.startswith("/c/llama.cpp-0.3.36-")
    assert cpu != cuda


def test_this_machine_never_starts_a_cuda_build_without_a_gpu() -> None:
    """The build machine has nvcc but no GPU driver: ./dev must choose the CPU build here."""
    smi = shutil.which("nvidia-smi")
    if smi and subprocess.run([smi, "-L"], capture_output=True, check=False).returncode == 0:
        pytest.skip("this machine has a working NVIDIA driver")
    env = {k: v for k, v in os.environ.items() if k != "CMAKE_ARGS"}
    bash = shutil.which("bash")
    assert bash is not None
    result = subprocess.run(
        [bash, "-c", f'source "{SCRIPT}" && llama_build_kind "$(llama_cmake_args)"'],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "cpu"


# Compiling, with fake tools: `python -m pip download` hands over a prepared source tarball and
# `cmake` prints ninja's progress and writes the two binaries, so the steps run in seconds.
VERSION = "0.3.36"
FAKE_PYTHON = """\
echo "$*" >>"$CALLS"
case "$*" in
  *" download "*) while [ "$1" != -d ]; do shift; done; cp "$SDIST" "$2/" ;;
  *) exit 1 ;;
esac
"""
FAKE_CMAKE = """\
echo "cmake $*" >>"$CALLS"
if [ "$1" != --build ]; then echo "-- Configuring done"; exit 0; fi
[ -n "${CMAKE_FAILS:-}" ] && { echo "ggml.c:1: error: boom"; exit 1; }
for i in 1 2 3 4 5 6 7 8 9 10; do echo "[$i/10] Building CXX object ggml-$i.o"; done
mkdir -p "$2/bin"
for target in llama-server llama-batched-bench ggml-rpc-server; do
  printf '#!/bin/sh\\necho %s\\n' "$target" >"$2/bin/$target"; chmod +x "$2/bin/$target"
done
"""
TOOLS = (
    *("uname", "grep", "tr", "sort", "paste", "sha256sum", "cut", "cat", "sed", "head", "tail"),
    *("mkdir", "rm", "mv", "cp", "chmod", "tar", "gzip", "dirname", "flock", "getconf"),
    *("hostname", "sh"),
)


@pytest.fixture
def build_env(tmp_path: Path) -> dict[str, str]:
    """A machine with fake compilers, CMake and pip, and an empty build cache."""
    folder = tmp_path / "tools"
    folder.mkdir()
    for tool in TOOLS:
        if (found := shutil.which(tool)) is None:
            pytest.skip(f"no {tool} on this machine")
        (folder / tool).symlink_to(found)
    for name in ("cc", "c++", "ninja"):
        fake(folder, name, "exit 0")
    fake(folder, "cmake", FAKE_CMAKE)
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    fake(venv_bin, "python", FAKE_PYTHON)
    source = tmp_path / "src" / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    source.mkdir(parents=True)
    (source / "CMakeLists.txt").write_text("project(llama)\n")
    sdist = tmp_path / f"llama_cpp_python-{VERSION}.tar.gz"
    subprocess.run(
        ["tar", "-czf", str(sdist), "-C", str(tmp_path / "src"), f"llama_cpp_python-{VERSION}"],
        check=True,
    )
    lock = tmp_path / "engine.lock"
    lock.write_text(f"# the engine\nllama-cpp-python=={VERSION} --hash=sha256:00\n")
    return {
        "PATH": str(folder),
        "HOME": str(tmp_path / "home"),
        "RBEE_LLAMA_CACHE": str(tmp_path / "cache"),
        "CALLS": str(tmp_path / "calls.log"),
        "SDIST": str(sdist),
        "PYTHON": str(venv_bin / "python"),
        "LOCK": str(lock),
    }


def ensure(env: dict[str, str], **extra: str) -> subprocess.CompletedProcess[str]:
    bash = shutil.which("bash")
    assert bash is not None
    return subprocess.run(
        [bash, str(SCRIPT), "ensure", env["PYTHON"], env["LOCK"]],
        env={**env, **extra},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_a_first_ensure_compiles_with_progress_and_a_second_uses_the_cache(
    build_env: dict[str, str],
) -> None:
    first = ensure(build_env)
    assert first.returncode == 0, first.stderr
    folder = Path(first.stdout.strip())
    assert folder.parent == Path(build_env["RBEE_LLAMA_CACHE"])
    assert folder.name.startswith(f"llama.cpp-{VERSION}-")
    assert (folder / "bin" / "llama-server").stat().st_mode & stat.S_IXUSR
    assert (folder / "bin" / "llama-batched-bench").exists()
    assert (folder / "bin" / "ggml-rpc-server").exists()  # every build lends devices too
    assert "compiling llama.cpp's server for cpu" in first.stderr
    # A line at each tenth of the way, not one per compiled file.
    progress = [line for line in first.stderr.splitlines() if "compiling llama.cpp: " in line]
    assert len(progress) == 10
    assert progress[0].startswith("llama.cpp: compiling llama.cpp: 10% (")
    assert progress[-1].startswith("llama.cpp: compiling llama.cpp: 100% (")
    assert not list(folder.parent.glob("*.partial"))  # the sources and objects are gone

    calls = Path(build_env["CALLS"]).read_text()
    second = ensure(build_env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == str(folder)
    assert second.stderr == ""
    assert Path(build_env["CALLS"]).read_text() == calls  # nothing downloaded or compiled again


def test_ensure_prefixes_its_lines_as_the_caller_asks(build_env: dict[str, str]) -> None:
    done = ensure(build_env, LLAMA_SAY="rbee: step")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines
    assert all(line.startswith("rbee: step ") for line in lines)


def test_a_machine_without_a_compiler_is_told_what_to_install(build_env: dict[str, str]) -> None:
    for name in ("cc", "c++"):
        (Path(build_env["PATH"]) / name).unlink()
    done = ensure(build_env, LLAMA_FAIL="rbee: error")
    assert done.returncode == 3
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("rbee: error ")
    assert "lacks what compiling llama.cpp needs: a C compiler, a C++ compiler (" in last
    assert "apt install build-essential cmake" in last
    assert not Path(build_env["CALLS"]).exists()  # nothing downloaded, nothing compiled
    assert done.stdout == ""


def test_a_machine_without_cmake_gets_it_from_pypi_or_is_told(build_env: dict[str, str]) -> None:
    (Path(build_env["PATH"]) / "cmake").unlink()
    done = ensure(build_env)  # the fake pip cannot install anything
    assert done.returncode == 3
    assert "installing CMake and ninja from PyPI" in done.stderr
    assert "lacks what compiling llama.cpp needs: CMake (" in done.stderr.strip().splitlines()[-1]
    assert "-m pip install" in Path(build_env["CALLS"]).read_text()


def test_a_failed_build_shows_the_log_tail_and_leaves_no_build(build_env: dict[str, str]) -> None:
    done = ensure(build_env, CMAKE_FAILS="1")
    assert done.returncode == 1
    assert "ggml.c:1: error: boom" in done.stderr
    assert "building llama.cpp failed; the log is" in done.stderr.strip().splitlines()[-1]
    cache = Path(build_env["RBEE_LLAMA_CACHE"])
    assert not [p for p in cache.iterdir() if p.is_dir() and not p.name.endswith(".partial")]
    # The next try starts over and succeeds.
    again = ensure(build_env)
    assert again.returncode == 0, again.stderr


def test_cuda_is_compiled_into_a_folder_of_its_own(build_env: dict[str, str]) -> None:
    cpu = ensure(build_env)
    assert cpu.returncode == 0, cpu.stderr
    fake(Path(build_env["PATH"]), "nvcc", NVCC_OK)
    fake(Path(build_env["PATH"]), "nvidia-smi", NVIDIA_SMI_OK)
    cuda = ensure(build_env)
    assert cuda.returncode == 0, cuda.stderr
    assert "compiling llama.cpp's server for cuda" in cuda.stderr
    assert cuda.stdout.strip() != cpu.stdout.strip()
    assert "-DGGML_CUDA=on" in Path(build_env["CALLS"]).read_text()


def test_an_offline_machine_uses_the_sources_in_a_find_links_folder_if_the_hash_matches(
    build_env: dict[str, str], tmp_path: Path
) -> None:
    sdist = Path(build_env["SDIST"])
    links = tmp_path / "links"
    links.mkdir()
    shutil.copy(sdist, links / sdist.name)
    lock = Path(build_env["LOCK"])
    lock.write_text(f"llama-cpp-python=={VERSION} --hash=sha256:{'0' * 64}\n")
    ensure(build_env, PIP_FIND_LINKS=str(links))
    assert " download " in Path(build_env["CALLS"]).read_text()  # a wrong hash: pip is asked
    Path(build_env["CALLS"]).unlink()
    shutil.rmtree(build_env["RBEE_LLAMA_CACHE"])

    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    lock.write_text(f"llama-cpp-python=={VERSION} --hash=sha256:{digest}\n")
    done = ensure(build_env, PIP_FIND_LINKS=f"/nowhere {links}")
    assert done.returncode == 0, done.stderr
    assert " download " not in Path(build_env["CALLS"]).read_text()  # only cmake ran
