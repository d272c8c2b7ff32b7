"""`--device`/`--gpu-layers`: the worker pins itself, refuses what cannot work, offloads the rest."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from rbee.common.serve import parse_settings
from rbee.worker.app import llama_server
from rbee.worker.device import prepare_device
from rbee.worker.settings import WorkerSettings
from rbee_testing.gpus import FakeGpu, FakeNvml, fake_llama_server


def settings_for(*flags: str, model: str = "m.gguf") -> WorkerSettings:
    argv = ["--model", model, "--port", "8080", "--queen-url", "http://q", *flags]
    return parse_settings(WorkerSettings, "llm-worker-rbee", argv)


@pytest.fixture
def cuda_build(tmp_path: Path) -> str:
    return fake_llama_server(tmp_path, "cuda")


@pytest.fixture
def cpu_build(tmp_path: Path) -> str:
    return fake_llama_server(tmp_path, "cpu")


def test_a_cuda_worker_is_pinned_to_its_gpu_before_llama_server_starts(cuda_build: str) -> None:
    environ: dict[str, str] = {"CUDA_VISIBLE_DEVICES": "0,1"}
    problem = prepare_device(
        "cuda:1",
        None,
        environ=environ,
        llama_server=cuda_build,
        nvml=FakeNvml([FakeGpu(), FakeGpu()]),
    )
    assert problem is None
    assert environ == {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def test_a_cpu_worker_hides_the_gpus_and_needs_no_gpu_support(cpu_build: str) -> None:
    environ: dict[str, str] = {}
    assert prepare_device("cpu:0", None, environ=environ, llama_server=cpu_build) is None
    assert environ == {"CUDA_VISIBLE_DEVICES": ""}


def test_a_build_without_gpu_support_is_refused_in_one_line(cpu_build: str) -> None:
    problem = prepare_device(
        "cuda:0", None, environ={}, llama_server=cpu_build, nvml=FakeNvml([FakeGpu()])
    )
    assert problem is not None
    assert problem.startswith("--device cuda:0: this llama.cpp build has no CUDA support")
    assert "CMAKE_ARGS=-DGGML_CUDA=on" in problem
    assert "\n" not in problem


def test_a_gpu_that_is_not_there_is_refused(cuda_build: str) -> None:
    problem = prepare_device(
        "cuda:1", None, environ={}, llama_server=cuda_build, nvml=FakeNvml([FakeGpu()])
    )
    assert problem == "--device cuda:1: this machine has no GPU cuda:1 (it has cuda:0)"
    problem = prepare_device(
        "cuda:0", None, environ={}, llama_server=cuda_build, nvml=FakeNvml(None)
    )
    assert problem == (
        "--device cuda:0: this machine has no NVIDIA GPU that NVML can see (Driver Not Loaded)"
    )


def test_gpu_layers_need_a_gpu_device(cuda_build: str) -> None:
    problem = prepare_device("cpu:0", 10, environ={}, llama_server=cuda_build)
    assert problem == "--gpu-layers needs a GPU --device (cuda:N or metal:0), not cpu:0"


def test_a_malformed_device_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        settings_for("--device", "gpu0")
    assert exited.value.code == 2
    assert "'gpu0' is not a device; expected cpu:0, cuda:N or metal:0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "gpu_layers", "ngl"),
    [
        ((), 0, "0"),
        (("--device", "cuda:0"), -1, "all"),
        (("--device", "cuda:1", "--gpu-layers", "12"), 12, "12"),
        (("--device", "metal:0"), -1, "all"),
    ],
)
def test_llama_server_is_told_to_offload_as_the_device_says(
    flags: tuple[str, ...],
    gpu_layers: int,
    ngl: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the server makes its socket dir
    server = llama_server(settings_for(*flags, "--ctx-size", "512"))
    assert server.config.gpu_layers == gpu_layers
    args = server.config.args(tmp_path / "s.sock")
    assert args[args.index("--n-gpu-layers") + 1] == ngl
