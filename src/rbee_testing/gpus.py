"""Stand-ins for NVML and for `llama-server --list-devices`, for tests of machines this one is not."""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

GIB = 1 << 30

# What llama-server builds print for --list-devices (llama.cpp's own wording).
LIST_DEVICES = {
    "cpu": "Available devices:\n  (none)\n",
    "cuda": (
        "ggml_cuda_init: found 1 CUDA devices:\n"
        "  Device 0: NVIDIA GeForce RTX 4090, compute capability 8.9, VMM: yes\n"
        "Available devices:\n  CUDA0: NVIDIA GeForce RTX 4090 (24080 MiB, 23700 MiB free)\n"
    ),
    "cuda-no-gpu": (
        "ggml_cuda_init: failed to initialize CUDA: no CUDA-capable device is detected\n"
        "Available devices:\n  (none)\n"
    ),
    "metal": "Available devices:\n  MTL0: Apple M2 Pro (21845 MiB, 21845 MiB free)\n",
}
Build = Literal["cpu", "cuda", "cuda-no-gpu", "metal"]


def fake_llama_server(folder: Path, build: Build) -> str:
    """An executable that answers `--list-devices` as a llama-server of that build does."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"llama-server-{build}"
    path.write_text(f"#!/bin/sh\ncat <<'EOF'\n{LIST_DEVICES[build]}EOF\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


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
