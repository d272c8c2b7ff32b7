"""Device ids, and the one-line verdict on whether a worker can compute on a device here."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbee.common.gpu import (
    DeviceRef,
    build_gpu_backend,
    device_environment,
    device_problem,
    gpu_backend_of,
    gpu_layers_for,
    nvidia_gpu_count,
    parse_device,
)
from rbee_testing.gpus import Build, FakeGpu, FakeNvml, fake_llama_server

CUDA0 = DeviceRef("cuda", 0)


@pytest.mark.parametrize(
    ("text", "kind", "index"),
    [("cpu:0", "cpu", 0), ("cuda:0", "cuda", 0), ("cuda:12", "cuda", 12), ("metal:0", "metal", 0)],
)
def test_device_ids_parse(text: str, kind: str, index: int) -> None:
    device = parse_device(text)
    assert (device.kind, device.index, device.id) == (kind, index, text)


@pytest.mark.parametrize("text", ["gpu0", "cuda", "cuda:", "cuda:01", "cuda:-1", "CPU:0", "rocm:0"])
def test_other_device_ids_are_refused_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected cpu:0, cuda:N or metal:0"):
        parse_device(text)


@pytest.mark.parametrize(
    ("build", "backend"),
    [("cpu", None), ("cuda", "cuda"), ("cuda-no-gpu", "cuda"), ("metal", "metal")],
)
def test_the_build_backend_comes_from_llama_server_list_devices(
    tmp_path: Path, build: Build, backend: str | None
) -> None:
    assert build_gpu_backend(fake_llama_server(tmp_path, build)) == backend


def test_a_llama_server_that_cannot_run_offloads_nothing(tmp_path: Path) -> None:
    assert build_gpu_backend(str(tmp_path / "missing")) is None
    # A CUDA build on a machine without the driver does not even start.
    assert (
        gpu_backend_of("error while loading shared libraries: libcuda.so.1: cannot open") == "cuda"
    )


def test_the_cpu_is_always_usable() -> None:
    assert device_problem(DeviceRef("cpu", 0), build_gpu=None, cuda_gpus=0) is None


def test_a_cpu_only_build_is_refused_with_the_rebuild_flags() -> None:
    problem = device_problem(CUDA0, build_gpu=None, cuda_gpus=1)
    assert problem is not None
    assert "no CUDA support" in problem
    assert "CMAKE_ARGS=-DGGML_CUDA=on" in problem
    assert "\n" not in problem


def test_a_missing_gpu_is_refused_naming_the_ones_there_are() -> None:
    problem = device_problem(DeviceRef("cuda", 2), build_gpu="cuda", cuda_gpus=2)
    assert problem == "this machine has no GPU cuda:2 (it has cuda:0, cuda:1)"


def test_no_driver_and_no_cuda_build_says_both() -> None:
    problem = device_problem(
        CUDA0, build_gpu=None, cuda_gpus=0, no_gpu_reason="NVML Shared Library Not Found"
    )
    assert problem is not None
    assert problem.startswith(
        "this machine has no NVIDIA GPU that NVML can see (NVML Shared Library Not Found), and "
        "this llama.cpp build has no CUDA support"
    )


def test_a_cuda_build_with_the_gpu_present_is_fine() -> None:
    assert device_problem(DeviceRef("cuda", 1), build_gpu="cuda", cuda_gpus=2) is None


def test_metal_is_macos_only_and_needs_a_metal_build() -> None:
    metal = DeviceRef("metal", 0)
    assert "macOS only" in (
        device_problem(metal, build_gpu=None, cuda_gpus=0, platform="linux") or ""
    )
    assert "no Metal support" in (
        device_problem(metal, build_gpu=None, cuda_gpus=0, platform="darwin") or ""
    )
    assert device_problem(metal, build_gpu="metal", cuda_gpus=0, platform="darwin") is None


def test_a_worker_is_pinned_to_its_gpu_and_a_cpu_worker_sees_none() -> None:
    assert device_environment(DeviceRef("cuda", 3)) == {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": "3",
    }
    assert device_environment(DeviceRef("cpu", 0)) == {"CUDA_VISIBLE_DEVICES": ""}


def test_all_layers_go_to_a_gpu_unless_told_fewer_and_none_to_the_cpu() -> None:
    assert gpu_layers_for(CUDA0, None) == -1
    assert gpu_layers_for(CUDA0, 20) == 20
    assert gpu_layers_for(DeviceRef("cpu", 0), None) == 0


def test_nvml_counts_gpus_and_says_why_there_are_none() -> None:
    assert nvidia_gpu_count(FakeNvml([FakeGpu(), FakeGpu()])) == (2, None)
    assert nvidia_gpu_count(FakeNvml(None)) == (0, "Driver Not Loaded")
