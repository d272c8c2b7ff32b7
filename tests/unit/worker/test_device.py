"""`--device`/`--gpu-layers`: the worker pins itself, refuses what cannot work, offloads the rest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rbee.common.serve import parse_settings
from rbee.testing.gguf import write_tiny_gguf
from rbee.testing.gpus import FakeGpu, FakeLlama, FakeNvml
from rbee.worker.app import llama_engine_factory
from rbee.worker.device import prepare_device
from rbee.worker.engines.base import EngineError
from rbee.worker.engines.llama_cpp import LlamaCppEngine
from rbee.worker.settings import WorkerSettings


def settings_for(*flags: str, model: str = "m.gguf") -> WorkerSettings:
    argv = ["--model", model, "--port", "8080", "--queen-url", "http://q", *flags]
    return parse_settings(WorkerSettings, "llm-worker-rbee", argv)


def test_a_cuda_worker_is_pinned_to_its_gpu_before_llama_cpp_starts() -> None:
    environ: dict[str, str] = {"CUDA_VISIBLE_DEVICES": "0,1"}
    problem = prepare_device(
        "cuda:1",
        None,
        environ=environ,
        llama=FakeLlama(True),
        nvml=FakeNvml([FakeGpu(), FakeGpu()]),
    )
    assert problem is None
    assert environ == {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def test_a_cpu_worker_hides_the_gpus_and_needs_no_gpu_support() -> None:
    environ: dict[str, str] = {}
    assert prepare_device("cpu:0", None, environ=environ, llama=FakeLlama(False)) is None
    assert environ == {"CUDA_VISIBLE_DEVICES": ""}


def test_a_build_without_gpu_support_is_refused_in_one_line() -> None:
    problem = prepare_device(
        "cuda:0", None, environ={}, llama=FakeLlama(False), nvml=FakeNvml([FakeGpu()])
    )
    assert problem is not None
    assert problem.startswith("--device cuda:0: this llama.cpp build has no CUDA support")
    assert "CMAKE_ARGS=-DGGML_CUDA=on" in problem
    assert "\n" not in problem


def test_a_gpu_that_is_not_there_is_refused() -> None:
    problem = prepare_device(
        "cuda:1", None, environ={}, llama=FakeLlama(True), nvml=FakeNvml([FakeGpu()])
    )
    assert problem == "--device cuda:1: this machine has no GPU cuda:1 (it has cuda:0)"
    problem = prepare_device("cuda:0", None, environ={}, llama=FakeLlama(True), nvml=FakeNvml(None))
    assert problem == (
        "--device cuda:0: this machine has no NVIDIA GPU that NVML can see (Driver Not Loaded)"
    )


def test_gpu_layers_need_a_gpu_device() -> None:
    problem = prepare_device("cpu:0", 10, environ={}, llama=FakeLlama(True))
    assert problem == "--gpu-layers needs a GPU --device (cuda:N or metal:0), not cpu:0"


def test_a_malformed_device_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        settings_for("--device", "gpu0")
    assert exited.value.code == 2
    assert "'gpu0' is not a device; expected cpu:0, cuda:N or metal:0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "gpu_layers"),
    [
        ((), 0),
        (("--device", "cuda:0"), -1),
        (("--device", "cuda:1", "--gpu-layers", "12"), 12),
        (("--device", "metal:0"), -1),
    ],
)
def test_the_engine_is_asked_to_offload_as_the_device_says(
    flags: tuple[str, ...], gpu_layers: int
) -> None:
    calls: list[dict[str, Any]] = []

    def load(path: Path, **options: Any) -> Any:
        calls.append(options)
        return object()

    factory = llama_engine_factory(settings_for(*flags, "--ctx-size", "512"), load)
    factory()
    assert calls == [{"ctx_size": 512, "threads": calls[0]["threads"], "gpu_layers": gpu_layers}]


def test_llama_cpp_gets_the_layers_and_gpu_0_of_its_pinned_view(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def llama(**options: Any) -> Any:
        seen.update(options)
        raise ValueError("stop here: the options are what this test is about")

    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(EngineError):
        LlamaCppEngine(model, ctx_size=256, threads=1, gpu_layers=-1, llama=llama)
    assert (seen["n_gpu_layers"], seen["main_gpu"], seen["n_ctx"]) == (-1, 0, 256)


def test_a_cpu_engine_really_loads_with_no_layers_offloaded(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    engine = LlamaCppEngine(model, ctx_size=256, threads=1, gpu_layers=0)
    try:
        assert engine.context_size == 256
    finally:
        engine.close()
