"""Flags and environment of rbee-hive, and device detection with and without NVIDIA GPUs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from rbee.hive.devices import DeviceProbe
from rbee.hive.settings import HiveSettings
from rbee_testing.gpus import fake_llama_server


def test_flags_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_TOKEN", "tok")
    monkeypatch.setattr("socket.gethostname", lambda: "box_1.local")
    settings = HiveSettings(queen_url="http://q:7833/")
    assert settings.queen_url == "http://q:7833"
    assert settings.token == "tok"
    assert settings.hive_id == "box_1.local"
    assert (settings.host, settings.port) == ("127.0.0.1", 7835)
    assert settings.port_range == range(8080, 9000)
    assert settings.models_dir.parts[-3:] == (".cache", "rbee", "models")
    assert settings.url == "http://127.0.0.1:7835"


def test_a_wildcard_bind_advertises_the_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "box")
    settings = HiveSettings(queen_url="http://q", host="0.0.0.0", port=9000)
    assert settings.url == "http://box:9000"
    assert settings.local_host == "127.0.0.1"
    assert HiveSettings(queen_url="http://q", advertise_host="10.0.0.5").url.startswith(
        "http://10.0.0.5:"
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("worker_ports", "9000-8000"),
        ("worker_ports", "x"),
        ("hive_id", "a b"),
        ("queen_url", "q:1"),
    ],
)
def test_bad_values_are_refused(field: str, value: str) -> None:
    with pytest.raises(ValidationError):
        HiveSettings.model_validate({"queen_url": "http://q", field: value})


class FakeNvml:
    """The part of pynvml's API the probe uses, for a machine with two GPUs."""

    def __init__(self, *, broken: bool = False) -> None:
        self.broken = broken
        self.shut_down = False

    def nvmlInit(self) -> None:
        if self.broken:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> Any:
        return b"NVIDIA RTX 3090" if handle == 0 else "NVIDIA RTX 4090"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(total=24 << 30, free=(20 - handle) << 30)


def test_gpus_come_from_nvml_after_the_cpu() -> None:
    nvml = FakeNvml()
    probe = DeviceProbe(nvml)
    probe.open()
    cpu, *gpus = probe.devices()
    probe.close()
    assert cpu.id == "cpu:0"
    assert (cpu.cores or 0) >= 1
    assert [(g.id, g.kind, g.name) for g in gpus] == [
        ("cuda:0", "cuda", "NVIDIA RTX 3090"),
        ("cuda:1", "cuda", "NVIDIA RTX 4090"),
    ]
    assert gpus[1].memory_free_bytes == 19 << 30
    assert nvml.shut_down


def test_no_nvidia_driver_means_cpu_only() -> None:
    probe = DeviceProbe(FakeNvml(broken=True))
    probe.open()
    assert [d.id for d in probe.devices()] == ["cpu:0"]


def test_gpus_a_cpu_only_build_cannot_use_say_why(tmp_path: Path) -> None:
    probe = DeviceProbe(FakeNvml(), fake_llama_server(tmp_path, "cpu"), platform="linux")
    probe.open()
    cpu, *gpus = probe.devices()
    assert cpu.problem is None
    assert all("no CUDA support" in (g.problem or "") for g in gpus)
    assert "no CUDA support" in (probe.problem("cuda:0", [cpu, *gpus]) or "")


def test_a_cuda_build_can_use_every_gpu_nvml_lists(tmp_path: Path) -> None:
    probe = DeviceProbe(FakeNvml(), fake_llama_server(tmp_path, "cuda"), platform="linux")
    probe.open()
    devices = probe.devices()
    assert [d.problem for d in devices] == [None, None, None]
    assert probe.problem("cuda:1", devices) is None
    assert (
        probe.problem("cuda:2", devices) == "this machine has no GPU cuda:2 (it has cuda:0, cuda:1)"
    )


def test_no_driver_is_named_when_a_gpu_is_asked_for(tmp_path: Path) -> None:
    probe = DeviceProbe(
        FakeNvml(broken=True), fake_llama_server(tmp_path, "cuda-no-gpu"), platform="linux"
    )
    probe.open()
    problem = probe.problem("cuda:0", probe.devices())
    assert (
        problem
        == "this machine has no NVIDIA GPU that NVML can see (NVML Shared Library Not Found)"
    )


def test_a_mac_with_a_metal_build_has_the_apple_gpu(tmp_path: Path) -> None:
    probe = DeviceProbe(
        FakeNvml(broken=True), fake_llama_server(tmp_path, "metal"), platform="darwin"
    )
    probe.open()
    cpu, metal = probe.devices()
    assert (metal.id, metal.kind, metal.problem) == ("metal:0", "metal", None)
    assert metal.memory_total_bytes == cpu.memory_total_bytes  # unified memory
