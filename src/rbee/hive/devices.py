"""What this machine can compute with: the CPU via psutil, NVIDIA GPUs via NVML (`pynvml`).

A machine without an NVIDIA driver simply has no GPUs: NVML failing to start is the normal
answer there, not an error.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import Any

import psutil
import pynvml

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


class DeviceProbe:
    """Finds the devices; NVML is started once (`open`) and shut down once (`close`)."""

    def __init__(self, nvml: ModuleType | Any = pynvml) -> None:
        self._nvml = nvml
        self._nvml_ready = False

    def open(self) -> None:
        try:
            self._nvml.nvmlInit()
        except Exception as exc:  # NVMLError subclasses, or a missing libnvidia-ml
            log.debug("no NVIDIA GPUs: %s", exc)
            return
        self._nvml_ready = True

    def close(self) -> None:
        if self._nvml_ready:
            self._nvml_ready = False
            try:
                self._nvml.nvmlShutdown()
            except Exception as exc:
                log.debug("NVML shutdown failed: %s", exc)

    def devices(self) -> list[Device]:
        return [cpu_device(), *self.gpus()]

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
