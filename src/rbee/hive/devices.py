"""What this machine can compute with: the CPU via psutil, NVIDIA GPUs via NVML (`pynvml`),
the Apple GPU on macOS; and, for each, whether this hive's llama.cpp build can run workers on it.

A machine without an NVIDIA driver simply has no GPUs: NVML failing to start is the normal
answer there, not an error. Free memory is read anew at every call (every heartbeat), so the
queen's placement sees what workers started since took.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Collection, Mapping, Sequence
from types import ModuleType
from typing import Any

import psutil
import pynvml

from rbee.common.gpu import GpuBackend, build_gpu_backend, device_problem, parse_device
from rbee.common.model_memory import gib
from rbee.common.sizes import format_size
from rbee.contracts.hives import Device

log = logging.getLogger("rbee.hive.devices")


def cpu_device() -> Device:
    memory = psutil.virtual_memory()
    return Device(
        id="cpu:0",
        kind="cpu",
        name=_cpu_name(),
        cores=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        memory_total_bytes=memory.total,
        memory_free_bytes=memory.available,
    )


def _cpu_name() -> str:
    # /proc/cpuinfo is the only place Linux names the CPU; elsewhere fall back to the arch.
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return os.uname().machine


def metal_device() -> Device:
    # Apple GPUs share the machine's memory: what the CPU has free, the GPU has free.
    memory = psutil.virtual_memory()
    return Device(
        id="metal:0",
        kind="metal",
        name="Apple GPU (Metal)",
        memory_total_bytes=memory.total,
        memory_free_bytes=memory.available,
    )


def within_limit(
    devices: Sequence[Device], limit: int | None, ram_held: int, vram_held: Mapping[str, int]
) -> list[Device]:
    """The devices as placement should see them under `--memory-limit`: each one's free memory
    is at most the limit less what this hive's workers hold there — RAM (`ram_held`) on the CPU
    and on Apple GPUs, whose memory is the machine's; a GPU's own figure for an NVIDIA GPU."""
    if limit is None:
        return list(devices)
    capped = []
    for device in devices:
        held = vram_held.get(device.id, 0) if device.kind == "cuda" else ram_held
        room = max(0, min(device.memory_free_bytes, limit - held))
        capped.append(
            device.model_copy(
                update={
                    "memory_free_bytes": room,
                    "memory_limit_bytes": limit,
                    "rbee_used_bytes": held,
                }
            )
        )
    return capped


def limit_problem(limit: int, devices: Sequence[Device]) -> str | None:
    """Why `--memory-limit` cannot be meant as given: it is more than the memory of every
    device, so it would limit nothing (a typo such as 100000GiB). A limit above a small GPU's
    memory but within the RAM is accepted: there the GPU's own size is the bound."""
    if not devices or any(limit <= d.memory_total_bytes for d in devices):
        return None
    largest = max(devices, key=lambda d: d.memory_total_bytes)
    return (
        f"--memory-limit {format_size(limit)} is more than any device of this machine has "
        f"(the largest, {largest.id}, has {gib(largest.memory_total_bytes)}): give at most that"
    )


def memory_devices(nvml: ModuleType | Any = pynvml) -> list[Device]:
    """The CPU and the NVIDIA GPUs with their memory, for checks at start (what the engine's
    build can use is not asked: that takes a while, and memory is the same either way)."""
    probe = DeviceProbe(nvml)
    probe._open_nvml()
    try:
        return [cpu_device(), *probe.gpus()]
    finally:
        probe.close()


class DeviceProbe:
    """Finds the devices; NVML is started once (`open`) and shut down once (`close`).

    `llama_server` is the engine binary the workers run (default: the one next to this Python);
    what GPU backend it was built with is asked once, at `open`.
    """

    def __init__(
        self,
        nvml: ModuleType | Any = pynvml,
        llama_server: str | None = None,
        platform: str = sys.platform,
    ) -> None:
        self._nvml = nvml
        self._nvml_ready = False
        self._nvml_error: str | None = None
        self._llama_server = llama_server
        self._platform = platform
        self.build_gpu: GpuBackend | None = None

    def open(self) -> None:
        self.build_gpu = build_gpu_backend(self._llama_server)
        self._open_nvml()

    def _open_nvml(self) -> None:
        try:
            self._nvml.nvmlInit()
        except Exception as exc:  # NVMLError subclasses, or a missing libnvidia-ml
            log.debug("no NVIDIA GPUs: %s", exc)
            self._nvml_error = str(exc)
            return
        self._nvml_ready = True

    def problem(self, device: str, devices: list[Device]) -> str | None:
        """Why no worker can start on `device` (a valid device id) of `devices` (as `devices()`
        found them); None if one can."""
        return device_problem(
            parse_device(device),
            build_gpu=self.build_gpu,
            cuda_gpus=sum(d.kind == "cuda" for d in devices),
            no_gpu_reason=self._nvml_error,
            platform=self._platform,
        )

    def close(self) -> None:
        if self._nvml_ready:
            self._nvml_ready = False
            try:
                self._nvml.nvmlShutdown()
            except Exception as exc:
                log.debug("NVML shutdown failed: %s", exc)

    def devices(self) -> list[Device]:
        gpus = self.gpus()
        found = [cpu_device()]
        for gpu in gpus:
            problem = device_problem(
                parse_device(gpu.id),
                build_gpu=self.build_gpu,
                cuda_gpus=len(gpus),
                platform=self._platform,
            )
            found.append(gpu.model_copy(update={"problem": problem}))
        if self._platform == "darwin" and self.build_gpu == "metal":
            found.append(metal_device())
        return found

    def gpu_memory_of(self, pids: Collection[int]) -> dict[str, int]:
        """What processes `pids` hold on each NVIDIA GPU, as NVML counts it per process. NVML
        reports the host's pids: inside a container with its own pid namespace none match,
        and the GPUs' own free memory is then the only bound."""
        held: dict[str, int] = {}
        if not self._nvml_ready or not pids:
            return held
        nvml = self._nvml
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                used = sum(
                    int(process.usedGpuMemory or 0)
                    for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                    if process.pid in pids
                )
                held[f"cuda:{index}"] = used
        except Exception as exc:  # as in gpus(): the hive carries on with what it has
            log.warning("reading NVIDIA GPU processes failed: %s", exc)
        return held

    def gpus(self) -> list[Device]:
        if not self._nvml_ready:
            return []
        nvml = self._nvml
        found: list[Device] = []
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = nvml.nvmlDeviceGetName(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                found.append(
                    Device(
                        id=f"cuda:{index}",
                        kind="cuda",
                        name=name.decode() if isinstance(name, bytes) else str(name),
                        memory_total_bytes=int(memory.total),
                        memory_free_bytes=int(memory.free),
                    )
                )
        except Exception as exc:  # a GPU that falls off the bus must not break the hive
            log.warning("reading NVIDIA GPUs failed: %s", exc)
        return found
