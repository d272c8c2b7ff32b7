"""Stand-ins for NVML and llama.cpp's GPU question, for tests of machines this one is not."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

GIB = 1 << 30


class FakeLlama:
    """llama-cpp-python as far as GPUs go: can this build offload layers to a GPU?"""

    def __init__(self, offload: bool) -> None:
        self.offload = offload

    def llama_supports_gpu_offload(self) -> bool:
        return self.offload


@dataclass
class FakeGpu:
    name: str = "NVIDIA GeForce RTX 4090"
    total_bytes: int = 24 * GIB
    free_bytes: int = 20 * GIB


class FakeNvml:
    """The part of pynvml rbee uses. `gpus=None` is a machine without the NVIDIA driver; change
    a GPU's `free_bytes` to play a worker taking memory."""

    def __init__(self, gpus: list[FakeGpu] | None) -> None:
        self.gpus = gpus
        self.shut_down = False

    def nvmlInit(self) -> None:
        if self.gpus is None:
            raise RuntimeError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus or [])

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return (self.gpus or [])[handle].name.encode()

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        gpu = (self.gpus or [])[handle]
        return SimpleNamespace(total=gpu.total_bytes, free=gpu.free_bytes)
