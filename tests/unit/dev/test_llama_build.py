"""./dev's choice of llama.cpp build, run against fake `nvcc`, `nvidia-smi` and `uname` on PATH."""

from __future__ import annotations

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
