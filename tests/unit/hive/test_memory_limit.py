"""`rbee-hive --memory-limit`: the devices a hive reports are capped by it, and a limit no device
could hold is refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from rbee.contracts.hives import Device
from rbee.hive.devices import DeviceProbe, limit_problem, within_limit
from rbee.hive.settings import HiveSettings
from rbee_testing.gpus import FakeGpu, FakeNvml

GIB = 1 << 30


def device(device_id: str, total_gib: float, free_gib: float) -> Device:
    return Device(
        id=device_id,
        kind="cpu" if device_id.startswith("cpu") else "cuda",
        name=device_id,
        memory_total_bytes=int(total_gib * GIB),
        memory_free_bytes=int(free_gib * GIB),
    )


def test_the_limit_is_a_flag_in_binary_units() -> None:
    assert HiveSettings(queen_url="http://q", memory_limit="512MiB").memory_limit == 512 << 20
    assert HiveSettings(queen_url="http://q").memory_limit is None
    for bad in ("-1GiB", "8GB", "0"):
        with pytest.raises(ValidationError, match="memory_limit"):
            HiveSettings(queen_url="http://q", memory_limit=bad)


def test_free_memory_is_the_smaller_of_the_free_and_the_limit_less_what_workers_hold() -> None:
    devices = [device("cpu:0", 64, 40), device("cuda:0", 24, 20), device("cuda:1", 24, 2)]
    cpu, gpu0, gpu1 = within_limit(devices, 8 * GIB, 3 * GIB, {"cuda:0": 5 * GIB})
    # RAM: 8 GiB limit, 3 GiB held by workers: 5 GiB left though 40 are free.
    assert (cpu.memory_free_bytes, cpu.rbee_used_bytes, cpu.memory_limit_bytes) == (
        5 * GIB,
        3 * GIB,
        8 * GIB,
    )
    assert gpu0.memory_free_bytes == 3 * GIB  # 8 - 5 held there
    assert gpu1.memory_free_bytes == 2 * GIB  # the GPU's own free memory is less
    assert gpu1.rbee_used_bytes == 0
    # Workers holding more than the limit (it was lowered): nothing is left, never below 0.
    (over,) = within_limit([device("cpu:0", 64, 40)], 2 * GIB, 3 * GIB, {})
    assert over.memory_free_bytes == 0


def test_without_a_limit_the_devices_are_reported_as_found() -> None:
    devices = [device("cpu:0", 64, 40)]
    assert within_limit(devices, None, 3 * GIB, {}) == devices
    assert devices[0].memory_limit_bytes is None


def test_a_limit_more_than_any_device_has_is_refused() -> None:
    devices = [device("cpu:0", 32, 20), device("cuda:0", 24, 20)]
    problem = limit_problem(100000 * GIB, devices)
    assert problem is not None
    assert "--memory-limit 100000GiB is more than any device" in problem
    assert "cpu:0, has 32.00 GiB" in problem
    assert limit_problem(32 * GIB, devices) is None
    assert limit_problem(28 * GIB, devices) is None  # a GPU smaller than it keeps its own bound


class NvmlWithProcesses(FakeNvml):
    def __init__(self, used: dict[int, dict[int, int | None]]) -> None:
        super().__init__([FakeGpu(), FakeGpu()])
        self.used = used  # by GPU index: pid -> bytes (None: NVML could not say)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in self.used[handle].items()]


def test_vram_held_counts_only_the_workers_processes() -> None:
    nvml = NvmlWithProcesses({0: {10: 3 * GIB, 11: GIB, 99: 7 * GIB}, 1: {12: None}})
    probe = DeviceProbe(nvml)
    probe.open()
    try:
        assert probe.gpu_memory_of({10, 11, 12}) == {"cuda:0": 4 * GIB, "cuda:1": 0}
        assert probe.gpu_memory_of(set()) == {}
    finally:
        probe.close()
