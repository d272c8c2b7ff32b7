"""Devices a worker can compute on, and whether this machine and its llama.cpp build allow it.

Device ids are `cpu:0`, `cuda:N` (NVIDIA GPU N, numbered as NVML and `nvidia-smi` number them:
PCI bus order) and `metal:0` (the Apple GPU). Every check here is a pure function over what the
caller found out (the GPU backend `llama-server` was built with, the GPUs NVML lists), so the
worker, the hive and the tests all reach the same verdict with the same words.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import pynvml

from rbee.common.engine_build import cached_llama_server
from rbee.contracts.workers import DEVICE_PATTERN

DeviceKind = Literal["cpu", "cuda", "metal"]
GpuBackend = Literal["cuda", "metal"]

DEVICE_RE = re.compile(DEVICE_PATTERN)
DEVICE_FORMAT = "cpu:0, cuda:N or metal:0"

# How to get a build that offloads, said where the refusal is.
REBUILD = {
    "cuda": (
        "rebuild llama-server with CMAKE_ARGS=-DGGML_CUDA=on ./dev install "
        "(./dev does so by itself where it finds nvcc and a working NVIDIA driver)"
    ),
    "metal": "rebuild llama-server on macOS with CMAKE_ARGS=-DGGML_METAL=on ./dev install",
}


@dataclass(frozen=True)
class DeviceRef:
    kind: DeviceKind
    index: int

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.index}"

    @property
    def is_gpu(self) -> bool:
        return self.kind != "cpu"


def parse_device(text: str) -> DeviceRef:
    """`cuda:1` → DeviceRef("cuda", 1); ValueError naming the accepted forms otherwise."""
    match = DEVICE_RE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a device; expected {DEVICE_FORMAT}")
    kind: DeviceKind = match.group(1)  # type: ignore[assignment]
    return DeviceRef(kind, int(match.group(2)))


SERVER_BINARY = "llama-server"
# What `llama-server --list-devices` prints of a GPU backend compiled in: its devices
# ("CUDA0: NVIDIA GeForce RTX 4090 (24080 MiB, 23700 MiB free)", "MTL0: Apple M2 …"), or, with no
# usable GPU, the backend's own complaint ("ggml_cuda_init: failed to initialize CUDA: …") or
# the loader's (a CUDA build on a machine without the driver: "libcuda.so.1: cannot open …").
_CUDA_SIGNS = re.compile(r"^\s*CUDA\d+\s*:|ggml_cuda_init|libcuda(rt)?\.so|libcublas", re.M)
_METAL_SIGNS = re.compile(r"^\s*(MTL\d*|Metal)\s*:|ggml_metal", re.M)


def default_llama_server() -> str:
    """The `llama-server` that ./dev installs next to the interpreter, else the one built on
    first use into the cache (a pip install), else whatever PATH finds."""
    candidate = Path(sys.executable).parent / SERVER_BINARY
    if candidate.exists():
        return str(candidate)
    cached = cached_llama_server()
    return str(cached) if cached is not None else SERVER_BINARY


def gpu_backend_of(list_devices: str) -> GpuBackend | None:
    """The GPU backend a llama.cpp build has, from what its `--list-devices` printed."""
    if _CUDA_SIGNS.search(list_devices):
        return "cuda"
    if _METAL_SIGNS.search(list_devices):
        return "metal"
    return None


def build_gpu_backend(binary: str | None = None) -> GpuBackend | None:
    """The GPU backend of the `llama-server` workers run (None: CPU only, or it cannot run)."""
    try:
        done = subprocess.run(
            [binary or default_llama_server(), "--list-devices"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return gpu_backend_of(done.stdout + done.stderr)


def device_problem(
    device: DeviceRef,
    *,
    build_gpu: GpuBackend | None,
    cuda_gpus: int,
    no_gpu_reason: str | None = None,
    platform: str = sys.platform,
) -> str | None:
    """Why no worker can compute on `device` here, in one line; None when it can.

    `cuda_gpus` is how many NVIDIA GPUs NVML lists; `no_gpu_reason` why it lists none (NVML's
    own error, e.g. "Driver Not Loaded"), if known.
    """
    if device.kind == "cpu":
        return None if device.index == 0 else f"there is one CPU device, cpu:0 (not {device.id})"
    problems = []
    if device.kind == "metal":
        if platform != "darwin":
            return "metal:0 is the Apple GPU and exists on macOS only"
        if device.index != 0:
            return f"there is one Apple GPU, metal:0 (not {device.id})"
    if device.kind == "cuda" and device.index >= cuda_gpus:
        if cuda_gpus == 0:
            why = f" ({no_gpu_reason})" if no_gpu_reason else ""
            problems.append(f"this machine has no NVIDIA GPU that NVML can see{why}")
        else:
            have = ", ".join(f"cuda:{i}" for i in range(cuda_gpus))
            problems.append(f"this machine has no GPU {device.id} (it has {have})")
    if build_gpu != device.kind:
        name = "CUDA" if device.kind == "cuda" else "Metal"
        problems.append(f"this llama.cpp build has no {name} support: {REBUILD[device.kind]}")
    return ", and ".join(problems) or None


def device_environment(device: DeviceRef) -> dict[str, str]:
    """Environment that pins a worker process to its device.

    A CUDA worker sees only its own GPU (numbered as NVML numbers them); a CPU worker sees none,
    because a CUDA build of llama.cpp would otherwise still move big matrix products to GPU 0.
    """
    if device.kind == "cuda":
        return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(device.index)}
    if device.kind == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    return {}


def gpu_layers_for(device: DeviceRef, gpu_layers: int | None) -> int:
    """llama.cpp's `n_gpu_layers`: every layer (-1) on a GPU unless told fewer, none on the CPU."""
    if not device.is_gpu:
        return 0
    return -1 if gpu_layers is None else gpu_layers


def nvidia_gpu_count(nvml: ModuleType | Any = pynvml) -> tuple[int, str | None]:
    """How many NVIDIA GPUs NVML lists, and why none when it cannot start (no driver, no GPU)."""
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError subclasses, or a missing libnvidia-ml
        return 0, str(exc)
    try:
        return int(nvml.nvmlDeviceGetCount()), None
    except Exception as exc:
        return 0, str(exc)
    finally:
        with contextlib.suppress(Exception):  # a failed shutdown changes nothing here
            nvml.nvmlShutdown()
